import { useEffect } from "react";
import {
  call,
  enc,
  type ConsumerLag,
  type DeadLetter,
  type OutboxReport,
  type Readiness,
  type Session,
} from "../api";
import { formatTime, shortId } from "../format";
import { Alert, Section, StatusBadge, TableHead, useAction, useLoad } from "../ui";

/** What an operator watches: outbox backlog, consumer lag, breakers and dead letters. */
export function Operations({ session }: { session: Session }) {
  const outbox = useLoad(() => call<OutboxReport[]>(session, "/api/v1/admin/outbox"), [session]);
  const lag = useLoad(() => call<ConsumerLag[]>(session, "/api/v1/admin/consumers"), [session]);
  const dead = useLoad(() => call<DeadLetter[]>(session, "/api/v1/admin/dead-letters"), [session]);
  // Readiness answers 503 when something is degraded, with the same body: read it either way.
  const ready = useLoad(
    () => fetch("/health/ready", { headers: { accept: "application/json" } }).then((r) => r.json() as Promise<Readiness>),
    [],
  );
  const action = useAction();
  const reloadAll = () => {
    outbox.reload();
    lag.reload();
    dead.reload();
    ready.reload();
  };
  useEffect(() => {
    const timer = setInterval(reloadAll, 5000);
    return () => clearInterval(timer);
  });
  const redrive = (d: DeadLetter) =>
    action.run(async () => {
      await call(session, `/api/v1/admin/dead-letters/${enc(d.id)}/redrive`, { method: "POST" });
      dead.reload();
      return `Dead letter ${shortId(d.id)} sent again.`;
    });
  const discard = (d: DeadLetter) =>
    action.run(async () => {
      if (!confirm(`Discard dead letter ${d.id}? It will not be delivered.`)) return;
      await call(session, `/api/v1/admin/dead-letters/${enc(d.id)}`, { method: "DELETE" });
      dead.reload();
      return `Dead letter ${shortId(d.id)} discarded.`;
    });
  const breakers = (ready.data?.checks ?? []).filter((c) => c.name.startsWith("breaker:"));
  return (
    <>
      <div className="grid">
        <Section title="Outbox backlog">
          <Alert error={outbox.error} />
          <table>
            <TableHead columns={["Service", "Pending", "Oldest"]} />
            <tbody>
              {(outbox.data ?? []).map((o) => (
                <tr key={o.service}>
                  <td>{o.service}</td>
                  <td className="num">{o.pending}</td>
                  <td>{o.lagSeconds != null ? `${o.lagSeconds.toFixed(1)} s` : "none"}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </Section>
        <Section title="Circuit breakers">
          <Alert error={ready.error} />
          <ul className="plain">
            {breakers.map((b) => (
              <li key={b.name}>
                <StatusBadge status={b.status} /> {b.name.slice("breaker:".length)}
              </li>
            ))}
            {ready.data && breakers.length === 0 ? <li className="muted">No breakers in this process.</li> : null}
          </ul>
        </Section>
      </div>
      <Section title="Consumer lag">
        <Alert error={lag.error} />
        <div className="table-wrap">
          <table>
            <TableHead columns={["Group", "Partition", "Position", "Head", "Lag"]} />
            <tbody>
              {(lag.data ?? []).map((l) => (
                <tr key={`${l.group}/${l.partition ?? ""}`}>
                  <td>{l.group}</td>
                  <td className="num">{l.partition ?? ""}</td>
                  <td className="num">{l.position}</td>
                  <td className="num">{l.head}</td>
                  <td className="num">{l.lag}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </Section>
      <Section title="Dead letters">
        <Alert error={dead.error ?? action.error} done={action.done} />
        <div className="table-wrap">
          <table>
            <TableHead columns={["Failed", "Source", "Group", "Topic", "Error", "Attempts", "Actions"]} />
            <tbody>
              {(dead.data ?? []).map((d) => (
                <tr key={d.id} data-dead-letter={d.id}>
                  <td>{formatTime(d.failedAt)}</td>
                  <td>{d.source}</td>
                  <td>{d.group}</td>
                  <td>{d.topic}</td>
                  <td className="wrap">{d.error}</td>
                  <td className="num">{d.attempts}</td>
                  <td className="row">
                    {d.redriveRequested ? (
                      <span className="muted">redrive asked</span>
                    ) : (
                      <>
                        <button type="button" disabled={action.busy} onClick={() => redrive(d)}>
                          Redrive
                        </button>
                        <button type="button" className="danger" disabled={action.busy} onClick={() => discard(d)}>
                          Discard
                        </button>
                      </>
                    )}
                  </td>
                </tr>
              ))}
              {dead.data && dead.data.length === 0 ? (
                <tr>
                  <td colSpan={7} className="empty">
                    No dead letters.
                  </td>
                </tr>
              ) : null}
            </tbody>
          </table>
        </div>
      </Section>
    </>
  );
}
