import { useState } from "react";
import { call, type Order, type Page, type Product, type Session } from "../api";
import { navigate } from "../router";
import { Alert, Field, Section, TableHead, useAction, useFields, useLoad } from "../ui";

/** The demo customer the OpenAPI examples and `--demo` use. */
const DEMO_CUSTOMER = "019ab1c2-0000-7000-8000-000000000001";

/** Places an order from the catalogue; answers with the new order's page. */
export function PlaceOrder({ session }: { session: Session }) {
  const products = useLoad(() => call<Page<Product>>(session, "/api/v1/products?limit=100"), [session]);
  const [customerId, setCustomerId] = useState(session.role === "customer" ? session.subject : DEMO_CUSTOMER);
  const [quantities, setQuantities] = useState<Record<string, string>>({});
  const [address, bind] = useFields({
    name: "Ada Lovelace",
    line1: "12 St James's Square",
    city: "London",
    postalCode: "SW1Y 4JH",
    country: "GB",
  });
  const [card, setCard] = useState("tok_ok");
  const [notes, setNotes] = useState("");
  // One key per form filled: a retried submit cannot place the order twice.
  const [idempotencyKey, setIdempotencyKey] = useState(() => crypto.randomUUID());
  const action = useAction();
  const catalogue = products.data?.items ?? [];
  const currency = catalogue[0]?.currency ?? "USD";
  const lines = catalogue
    .filter((p) => Number(quantities[p.sku] ?? 0) > 0)
    .map((p) => ({ sku: p.sku, quantity: Number(quantities[p.sku]), unitPrice: p.price }));
  const submit = () =>
    action.run(async () => {
      const order = await call<Order>(session, "/api/v1/orders", {
        method: "POST",
        idempotencyKey,
        body: {
          customerId: customerId.trim(),
          currency,
          items: lines,
          shippingAddress: address,
          notes: notes.trim() || undefined,
          payment: { method: "card", token: card.trim() },
        },
      });
      setIdempotencyKey(crypto.randomUUID());
      navigate(`/orders/${order.id}`);
    });
  return (
    <Section title="Place an order">
      <form
        className="stack"
        aria-label="Place an order"
        onSubmit={(e) => {
          e.preventDefault();
          submit();
        }}
      >
        <Field label="Customer id">
          <input
            value={customerId}
            readOnly={session.role === "customer"}
            onChange={(e) => setCustomerId(e.target.value)}
            required
          />
        </Field>
        <fieldset>
          <legend>Items</legend>
          <Alert error={products.error} />
          <div className="table-wrap">
            <table>
              <TableHead columns={["Product", "Price", "Available", "Quantity"]} />
              <tbody>
                {catalogue.map((p) => (
                  <tr key={p.sku}>
                    <td>
                      {p.name} <span className="muted">{p.sku}</span>
                    </td>
                    <td className="num">
                      {p.price} {p.currency}
                    </td>
                    <td className="num">{p.available}</td>
                    <td>
                      <input
                        type="number"
                        min={0}
                        max={p.available}
                        inputMode="numeric"
                        aria-label={`Quantity of ${p.sku}`}
                        value={quantities[p.sku] ?? ""}
                        onChange={(e) => setQuantities((q) => ({ ...q, [p.sku]: e.target.value }))}
                      />
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </fieldset>
        <fieldset className="grid">
          <legend>Ship to</legend>
          <Field label="Name">
            <input {...bind("name")} required />
          </Field>
          <Field label="Address">
            <input {...bind("line1")} required />
          </Field>
          <Field label="City">
            <input {...bind("city")} required />
          </Field>
          <Field label="Postal code">
            <input {...bind("postalCode")} required />
          </Field>
          <Field label="Country" hint="ISO 3166 code, e.g. GB">
            <input {...bind("country")} required maxLength={2} />
          </Field>
        </fieldset>
        <Field label="Card token" hint="The embedded payment simulator knows tok_ok, tok_declined and tok_flaky.">
          <input value={card} onChange={(e) => setCard(e.target.value)} required />
        </Field>
        <Field label="Notes">
          <input value={notes} onChange={(e) => setNotes(e.target.value)} />
        </Field>
        <Alert error={action.error} />
        <button type="submit" disabled={action.busy || lines.length === 0}>
          Place order
        </button>
      </form>
    </Section>
  );
}
