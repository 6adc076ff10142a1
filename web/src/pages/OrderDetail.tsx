import { useEffect, useState } from "react";
import {
  call,
  enc,
  withQuery,
  type HistoryEntry,
  type Notification,
  type Order,
  type Page,
  type Payment,
  type Session,
  type Status,
} from "../api";
import { entryLabel, formatTime, manualTransitions, money, statusAction } from "../format";
import { followOrder } from "../sse";
import { Alert, Field, Section, StatusBadge, TableHead, useAction, useLoad } from "../ui";

/** One order: its lines, timeline (live), payment, notifications and the actions it allows. */
export function OrderDetail({ session, id }: { session: Session; id: string }) {
  const order = useLoad(() => call<Order>(session, `/api/v1/orders/${enc(id)}`), [session, id]);
  const [timeline, setTimeline] = useState<HistoryEntry[]>([]);
  const [stream, setStream] = useState<"connecting" | "live" | "reconnecting">("connecting");
  const payment = useLoad(
    () => call<Page<Payment>>(session, withQuery("/api/v1/payments", { orderId: id })).then((p) => p.items[0] ?? null),
    [session, id],
  );
  const notifications = useLoad(
    () => call<Page<Notification>>(session, withQuery("/api/v1/notifications", { orderId: id, limit: 50 })),
    [session, id],
  );
  const { reload: reloadOrder } = order;
  const { reload: reloadPayment } = payment;
  const { reload: reloadNotifications } = notifications;

  // The timeline is the event stream: the whole history first, then each change as it
  // commits; every change also refreshes what it may have changed.
  useEffect(() => {
    setTimeline([]);
    const abort = new AbortController();
    followOrder(
      session,
      id,
      0,
      (entry) => {
        setTimeline((t) => [...t, entry]);
        reloadOrder();
        reloadPayment();
        reloadNotifications();
      },
      abort.signal,
      setStream,
    );
    return () => abort.abort();
  }, [session, id]);

  // Notifications go out after the event that causes them: look again for a while.
  useEffect(() => {
    const timer = setInterval(reloadNotifications, 3000);
    return () => clearInterval(timer);
  }, [session, id]);

  if (order.error && !order.data) return <Alert error={order.error} />;
  const o = order.data;
  if (!o) return <p aria-busy="true">Loading…</p>;
  return (
    <>
      <Section title={`Order ${o.id}`} actions={<StatusBadge status={o.status} />}>
        <p className="muted">
          <span>{money(o.total, o.currency)}</span> · placed {formatTime(o.createdAt)} · customer{" "}
          <code>{o.customerId}</code> · stream <span data-stream={stream}>{stream}</span>
        </p>
        {o.cancelReason ? <p>Cancelled: {o.cancelReason}</p> : null}
        <div className="table-wrap">
          <table>
            <TableHead columns={["SKU", "Quantity", "Unit price", "Line total"]} />
            <tbody>
              {o.items.map((line) => (
                <tr key={line.sku}>
                  <td>{line.sku}</td>
                  <td className="num">{line.quantity}</td>
                  <td className="num">{line.unitPrice}</td>
                  <td className="num">{line.lineTotal}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <p>
          Ship to {o.shippingAddress.name}, {o.shippingAddress.line1}, {o.shippingAddress.postalCode}{" "}
          {o.shippingAddress.city}, {o.shippingAddress.country}
          {o.shipping ? ` · ${o.shipping.carrier} ${o.shipping.trackingNumber}` : ""}
        </p>
        <Actions session={session} order={o} onChange={(next) => order.set(next)} />
      </Section>
      <div className="grid">
        <Section title="Timeline">
          <ol className="timeline" aria-live="polite">
            {timeline.map((entry) => (
              <li key={entry.version} data-event={entry.type} data-to-status={entry.toStatus ?? undefined}>
                <span className="when">{formatTime(entry.time)}</span>
                <strong>{entryLabel(entry)}</strong>
                {entry.toStatus ? (
                  <>
                    {" "}
                    → <StatusBadge status={entry.toStatus} />
                  </>
                ) : null}
                {entry.reason ? <span className="muted"> {entry.reason}</span> : null}
              </li>
            ))}
          </ol>
        </Section>
        <Section title="Payment">
          <Alert error={payment.error} />
          {payment.data ? (
            <dl className="facts" aria-label="Payment">
              <dt>Status</dt>
              <dd data-payment-status={payment.data.status}>{payment.data.status}</dd>
              <dt>Amount</dt>
              <dd>{money(payment.data.amount, payment.data.currency)}</dd>
              <dt>Refunded</dt>
              <dd data-refunded={payment.data.refundedAmount}>
                {money(payment.data.refundedAmount, payment.data.currency)}
              </dd>
              {payment.data.failureReason ? (
                <>
                  <dt>Failure</dt>
                  <dd>{payment.data.failureReason}</dd>
                </>
              ) : null}
              {payment.data.refunds.map((r) => (
                <div key={r.id} className="refund">
                  <dt>Refund</dt>
                  <dd>
                    {money(r.amount, payment.data!.currency)} {r.status} · {r.reason}
                  </dd>
                </div>
              ))}
            </dl>
          ) : (
            <p className="muted">{payment.loading ? "Loading…" : "No payment for this order."}</p>
          )}
        </Section>
        <Section title="Notifications">
          <Alert error={notifications.error} />
          <ul className="plain" aria-label="Notifications of this order">
            {(notifications.data?.items ?? []).map((n) => (
              <li key={n.id} data-notification={n.eventType}>
                <StatusBadge status={n.status} /> {n.channel} to {n.recipient}: {n.subject}
              </li>
            ))}
            {notifications.data && notifications.data.items.length === 0 ? (
              <li className="muted">None yet.</li>
            ) : null}
          </ul>
        </Section>
      </div>
    </>
  );
}

function Actions({ session, order, onChange }: { session: Session; order: Order; onChange: (o: Order) => void }) {
  const action = useAction();
  const [reason, setReason] = useState("");
  const [carrier, setCarrier] = useState("");
  const [tracking, setTracking] = useState("");
  const manual = manualTransitions(order.allowedNext);
  const canCancel = order.allowedNext.includes("CANCELLED");
  const setStatus = (status: Status) =>
    action.run(async () => {
      const body: Record<string, unknown> = { status };
      if (status === "SHIPPED" && !order.shipping) body.shipping = { carrier, trackingNumber: tracking };
      onChange(
        await call<Order>(session, `/api/v1/orders/${enc(order.id)}/status`, {
          method: "PUT",
          body,
          ifMatch: order.version,
        }),
      );
      return `Order is now ${status}.`;
    });
  const cancel = () =>
    action.run(async () => {
      onChange(
        await call<Order>(session, withQuery(`/api/v1/orders/${enc(order.id)}`, { reason: reason.trim() }), {
          method: "DELETE",
          ifMatch: order.version,
        }),
      );
      return "Order cancelled.";
    });
  if (manual.length === 0 && !canCancel) return null;
  return (
    <form className="actions" onSubmit={(e) => e.preventDefault()} aria-label="Order actions">
      {session.role === "admin" && manual.includes("SHIPPED") && !order.shipping ? (
        <>
          <Field label="Carrier">
            <input value={carrier} onChange={(e) => setCarrier(e.target.value)} />
          </Field>
          <Field label="Tracking number">
            <input value={tracking} onChange={(e) => setTracking(e.target.value)} />
          </Field>
        </>
      ) : null}
      {session.role === "admin"
        ? manual.map((status) => (
            <button key={status} type="button" disabled={action.busy} onClick={() => setStatus(status)}>
              {statusAction(status)}
            </button>
          ))
        : null}
      {canCancel ? (
        <>
          <Field label="Cancellation reason">
            <input value={reason} onChange={(e) => setReason(e.target.value)} placeholder="optional" />
          </Field>
          <button type="button" className="danger" disabled={action.busy} onClick={cancel}>
            Cancel order
          </button>
        </>
      ) : null}
      <Alert error={action.error} done={action.done} />
    </form>
  );
}
