import { useState } from "react";
import { call, enc, type Page, type Product, type Session } from "../api";
import { formatTime } from "../format";
import { Alert, Field, Section, useAction, useFields, useLoad } from "../ui";

/** Stock of every product, set per product; new products (admin). */
export function Inventory({ session }: { session: Session }) {
  const products = useLoad(() => call<Page<Product>>(session, "/api/v1/products?limit=100"), [session]);
  const admin = session.role === "admin";
  return (
    <>
      <Section title="Inventory">
        <Alert error={products.error} />
        <div className="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">SKU</th>
                <th scope="col">Name</th>
                <th scope="col">Price</th>
                <th scope="col">On hand</th>
                <th scope="col">Reserved</th>
                <th scope="col">Available</th>
                <th scope="col">Updated</th>
                {admin ? <th scope="col">Set stock</th> : null}
              </tr>
            </thead>
            <tbody>
              {(products.data?.items ?? []).map((p) => (
                <tr key={p.sku} data-sku={p.sku}>
                  <td>{p.sku}</td>
                  <td>{p.name}</td>
                  <td className="num">
                    {p.price} {p.currency}
                  </td>
                  <td className="num">{p.onHand}</td>
                  <td className="num">{p.reserved}</td>
                  <td className="num">{p.available}</td>
                  <td>{formatTime(p.updatedAt)}</td>
                  {admin ? (
                    <td>
                      <SetStock session={session} product={p} onSaved={products.reload} />
                    </td>
                  ) : null}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </Section>
      {admin ? <NewProduct session={session} onSaved={products.reload} /> : null}
    </>
  );
}

function SetStock({ session, product, onSaved }: { session: Session; product: Product; onSaved: () => void }) {
  const [onHand, setOnHand] = useState(String(product.onHand));
  const action = useAction();
  return (
    <form
      className="inline"
      onSubmit={(e) => {
        e.preventDefault();
        action.run(async () => {
          await call(session, `/api/v1/inventory/${enc(product.sku)}`, {
            method: "PUT",
            body: { onHand: Number(onHand) },
          });
          onSaved();
        });
      }}
    >
      <input
        type="number"
        min={0}
        aria-label={`On hand of ${product.sku}`}
        value={onHand}
        onChange={(e) => setOnHand(e.target.value)}
      />
      <button type="submit" disabled={action.busy}>
        Set
      </button>
      <Alert error={action.error} />
    </form>
  );
}

function NewProduct({ session, onSaved }: { session: Session; onSaved: () => void }) {
  const [form, bind] = useFields({ sku: "", name: "", price: "", currency: "USD", onHand: "0" });
  const action = useAction();
  return (
    <Section title="New product">
      <form
        className="grid"
        aria-label="New product"
        onSubmit={(e) => {
          e.preventDefault();
          action.run(async () => {
            await call(session, "/api/v1/products", {
              method: "POST",
              body: { ...form, onHand: Number(form.onHand) },
            });
            onSaved();
            return `${form.sku} added.`;
          });
        }}
      >
        <Field label="SKU">
          <input {...bind("sku")} required />
        </Field>
        <Field label="Name">
          <input {...bind("name")} required />
        </Field>
        <Field label="Price">
          <input {...bind("price")} inputMode="decimal" required />
        </Field>
        <Field label="Currency">
          <input {...bind("currency")} maxLength={3} required />
        </Field>
        <Field label="On hand">
          <input type="number" min={0} {...bind("onHand")} required />
        </Field>
        <div>
          <button type="submit" disabled={action.busy}>
            Add product
          </button>
        </div>
        <Alert error={action.error} done={action.done} />
      </form>
    </Section>
  );
}
