import { call, withQuery, type Customer, type Page, type Session } from "../api";
import { formatTime } from "../format";
import { Alert, Field, Pager, Section, TableHead, useAction, useCursorPages, useFields, useLoad } from "../ui";

/** Customers (admin) with paging, and a form for a new one. */
export function Customers({ session }: { session: Session }) {
  const pages = useCursorPages();
  const cursor = pages.cursor;
  const page = useLoad(
    () => call<Page<Customer>>(session, withQuery("/api/v1/customers", { limit: 20, cursor })),
    [session, cursor],
  );
  return (
    <>
      <Section title="Customers">
        <Alert error={page.error} />
        <div className="table-wrap">
          <table>
            <TableHead columns={["Name", "Email", "Phone", "Notified by email of", "Since", "Orders"]} />
            <tbody>
              {(page.data?.items ?? []).map((c) => (
                <tr key={c.id}>
                  <td title={c.id}>{c.name}</td>
                  <td>{c.email}</td>
                  <td>{c.phone ?? ""}</td>
                  <td>{c.notificationPreferences.email.join(", ")}</td>
                  <td>{formatTime(c.createdAt)}</td>
                  <td>
                    <a href={`#/orders?customerId=${c.id}`} aria-label={`Orders of ${c.name}`}>
                      Orders
                    </a>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <Pager pages={pages} nextCursor={page.data?.nextCursor} />
      </Section>
      <NewCustomer session={session} onSaved={page.reload} />
    </>
  );
}

function NewCustomer({ session, onSaved }: { session: Session; onSaved: () => void }) {
  const [form, bind] = useFields({ name: "", email: "", phone: "" });
  const action = useAction();
  return (
    <Section title="New customer">
      <form
        className="grid"
        aria-label="New customer"
        onSubmit={(e) => {
          e.preventDefault();
          action.run(async () => {
            const created = await call<Customer>(session, "/api/v1/customers", {
              method: "POST",
              body: { name: form.name, email: form.email, phone: form.phone.trim() || undefined },
            });
            onSaved();
            return `Customer ${created.id} created.`;
          });
        }}
      >
        <Field label="Name">
          <input {...bind("name")} required />
        </Field>
        <Field label="Email">
          <input type="email" {...bind("email")} required />
        </Field>
        <Field label="Phone" hint="E.164, e.g. +447700900123">
          <input type="tel" {...bind("phone")} />
        </Field>
        <div>
          <button type="submit" disabled={action.busy}>
            Create customer
          </button>
        </div>
        <Alert error={action.error} done={action.done} />
      </form>
    </Section>
  );
}
