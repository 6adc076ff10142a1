import { useEffect, useState } from "react";
import { call, enc, withQuery, type Notification, type Page, type Session, type Template } from "../api";
import { formatTime, shortId } from "../format";
import { Alert, Field, Pager, Section, StatusBadge, TableHead, useAction, useCursorPages, useLoad } from "../ui";

const EVENTS = ["order.created", "order.confirmed", "order.shipped", "order.delivered", "order.cancelled", "payment.refunded"];
const CHANNELS = ["email", "sms"];
export const TEMPLATE_KEYS = EVENTS.flatMap((e) => CHANNELS.map((c) => `${e}.${c}`));

/** The notification log (with redrive of DEAD ones) and the templates. */
export function Notifications({ session }: { session: Session }) {
  return (
    <>
      <Log session={session} />
      {session.role === "admin" ? <Templates session={session} /> : null}
    </>
  );
}

function Log({ session }: { session: Session }) {
  const [status, setStatus] = useState("");
  const [orderId, setOrderId] = useState("");
  const pages = useCursorPages();
  const cursor = pages.cursor;
  const page = useLoad(
    () =>
      call<Page<Notification>>(
        session,
        withQuery("/api/v1/notifications", { status, orderId: orderId.trim(), limit: 20, cursor }),
      ),
    [session, status, orderId, cursor],
  );
  const action = useAction();
  const redrive = (n: Notification) =>
    action.run(async () => {
      await call(session, `/api/v1/notifications/${enc(n.id)}/redrive`, { method: "POST" });
      page.reload();
      return `Notification ${shortId(n.id)} is due again.`;
    });
  return (
    <Section title="Notifications">
      <form className="filters" aria-label="Filter notifications" onSubmit={(e) => e.preventDefault()}>
        <Field label="Status">
          <select
            value={status}
            onChange={(e) => {
              setStatus(e.target.value);
              pages.first();
            }}
          >
            <option value="">Any</option>
            {["PENDING", "SENT", "FAILED", "DEAD"].map((s) => (
              <option key={s}>{s}</option>
            ))}
          </select>
        </Field>
        <Field label="Order id">
          <input
            value={orderId}
            onChange={(e) => {
              setOrderId(e.target.value);
              pages.first();
            }}
          />
        </Field>
      </form>
      <Alert error={page.error ?? action.error} done={action.done} />
      <div className="table-wrap">
        <table>
          <TableHead columns={["When", "Event", "Channel", "To", "Subject", "Status", "Attempts", "Order", ""]} />
          <tbody>
            {(page.data?.items ?? []).map((n) => (
              <tr key={n.id}>
                <td>{formatTime(n.createdAt)}</td>
                <td>{n.eventType}</td>
                <td>{n.channel}</td>
                <td>{n.recipient}</td>
                <td>{n.subject}</td>
                <td>
                  <StatusBadge status={n.status} />
                  {n.lastError ? <small className="muted"> {n.lastError}</small> : null}
                </td>
                <td className="num">{n.attempts}</td>
                <td>{n.orderId ? <a href={`#/orders/${n.orderId}`}>{shortId(n.orderId)}</a> : null}</td>
                <td>
                  {session.role === "admin" && n.status === "DEAD" ? (
                    <button type="button" disabled={action.busy} onClick={() => redrive(n)}>
                      Redrive
                    </button>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <Pager pages={pages} nextCursor={page.data?.nextCursor} />
    </Section>
  );
}

interface Rendered {
  subject: string;
  textBody: string;
  htmlBody?: string;
}

function Templates({ session }: { session: Session }) {
  const [key, setKey] = useState(TEMPLATE_KEYS[0]);
  const template = useLoad(() => call<Template>(session, `/api/v1/notification-templates/${enc(key)}`), [session, key]);
  const [draft, setDraft] = useState({ subject: "", textBody: "", htmlBody: "" });
  const [preview, setPreview] = useState<Rendered>();
  const action = useAction();
  useEffect(() => {
    if (template.data) {
      setDraft({
        subject: template.data.subject,
        textBody: template.data.textBody,
        htmlBody: template.data.htmlBody ?? "",
      });
      setPreview(undefined);
    }
  }, [template.data]);
  const texts = () => ({
    subject: draft.subject,
    textBody: draft.textBody,
    htmlBody: draft.htmlBody.trim() ? draft.htmlBody : undefined,
  });
  const showPreview = () =>
    action.run(async () => {
      setPreview(
        await call<Rendered>(session, `/api/v1/notification-templates/${enc(key)}/preview`, {
          method: "POST",
          body: { template: texts() },
        }),
      );
    });
  const save = () =>
    action.run(async () => {
      template.set(
        await call<Template>(session, `/api/v1/notification-templates/${enc(key)}`, { method: "PUT", body: texts() }),
      );
      return `${key} saved.`;
    });
  const email = key.endsWith(".email");
  return (
    <Section title="Templates">
      <form className="stack" aria-label="Edit a template" onSubmit={(e) => e.preventDefault()}>
        <Field label="Template">
          <select value={key} onChange={(e) => setKey(e.target.value)}>
            {TEMPLATE_KEYS.map((k) => (
              <option key={k}>{k}</option>
            ))}
          </select>
        </Field>
        <Alert error={template.error} />
        {template.data ? (
          <p className="muted">
            Version {template.data.version}, saved {formatTime(template.data.updatedAt)}. Variables: customer.name,
            order.id, order.total, order.currency, order.items, order.shipping…
          </p>
        ) : null}
        {email ? (
          <Field label="Subject">
            <input value={draft.subject} onChange={(e) => setDraft((d) => ({ ...d, subject: e.target.value }))} />
          </Field>
        ) : null}
        <Field label={email ? "Text body" : "Message"}>
          <textarea
            rows={4}
            value={draft.textBody}
            onChange={(e) => setDraft((d) => ({ ...d, textBody: e.target.value }))}
          />
        </Field>
        {email ? (
          <Field label="HTML body">
            <textarea
              rows={4}
              value={draft.htmlBody}
              onChange={(e) => setDraft((d) => ({ ...d, htmlBody: e.target.value }))}
            />
          </Field>
        ) : null}
        <div className="row">
          <button type="button" onClick={showPreview} disabled={action.busy}>
            Preview
          </button>
          <button type="button" onClick={save} disabled={action.busy}>
            Save
          </button>
        </div>
        <Alert error={action.error} done={action.done} />
      </form>
      {preview ? (
        <div className="preview" aria-label="Preview">
          {email ? <p className="preview-subject">{preview.subject}</p> : null}
          <pre>{preview.textBody}</pre>
          {preview.htmlBody ? (
            // The HTML part in a sandboxed frame: no script, no access to the console.
            <iframe title="HTML preview" sandbox="" srcDoc={preview.htmlBody} />
          ) : null}
        </div>
      ) : null}
    </Section>
  );
}
