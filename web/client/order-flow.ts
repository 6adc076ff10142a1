// A client generated from the served /openapi.json (openapi-typescript types + openapi-fetch)
// places an order, waits for the saga to confirm it and reads its history: what a team that
// generates its client from the document does on day one. Every call is type-checked against
// the generated types (tsc), then run against the real binary (scripts/client-test.sh).
import createClient from "openapi-fetch";
import type { paths } from "./generated/schema";

declare const process: { env: Record<string, string | undefined> };
const base = process.env.ORDERWAVE_URL;
const token = process.env.ORDERWAVE_TOKEN;
if (!base || !token) {
  throw new Error("set ORDERWAVE_URL and ORDERWAVE_TOKEN (scripts/client-test.sh does)");
}
const client = createClient<paths>({ baseUrl: base, headers: { Authorization: `Bearer ${token}` } });

function check(condition: unknown, message: string): asserts condition {
  if (!condition) {
    throw new Error(message);
  }
}

const products = await client.GET("/api/v1/products", { params: { query: { limit: 10 } } });
check(products.data, `listing products: ${products.response.status}`);
const product = products.data.items.find((p) => p.available >= 2);
check(product, "the demo catalogue has a product in stock");

const customers = await client.GET("/api/v1/customers", { params: { query: { limit: 1 } } });
check(customers.data && customers.data.items.length > 0, "the demo catalogue has a customer");
const customer = customers.data.items[0];

// The document ties a price's decimals to the currency (oneOf by currency): a client names the
// currency it prices in, and the generated types check the body against that branch.
const currency = product.currency;
check(currency === "USD", `the demo catalogue prices in USD, not ${currency}`);

const placed = await client.POST("/api/v1/orders", {
  params: { header: { "Idempotency-Key": `client-test-${Date.now()}` } },
  body: {
    customerId: customer.id,
    currency,
    items: [{ sku: product.sku, quantity: 2, unitPrice: product.price }],
    shippingAddress: { name: "Ada Lovelace", line1: "12 Analytical Row", city: "London", postalCode: "N1 7AA", country: "GB" },
    payment: { method: "card", token: "tok_ok" },
  },
});
check(placed.data, `placing the order: ${placed.response.status} ${JSON.stringify(placed.error)}`);
check(placed.response.status === 201, `placing the order answered ${placed.response.status}`);
const id = placed.data.id;
check(placed.data.status === "PENDING", `a new order is PENDING, not ${placed.data.status}`);

let status = placed.data.status;
for (let i = 0; i < 150 && status !== "CONFIRMED"; i++) {
  await new Promise((resolve) => setTimeout(resolve, 200));
  const read = await client.GET("/api/v1/orders/{id}", { params: { path: { id } } });
  check(read.data, `reading the order: ${read.response.status}`);
  status = read.data.status;
  check(status !== "CANCELLED", "the saga cancelled the order");
}
check(status === "CONFIRMED", `the order was not confirmed within 30 s (${status})`);

const history = await client.GET("/api/v1/orders/{id}/history", { params: { path: { id } } });
check(history.data, `reading the history: ${history.response.status}`);
const types = history.data.entries.map((e) => e.type);
check(types[0] === "OrderPlaced", `the history starts with OrderPlaced: ${types.join(", ")}`);
const confirmed = history.data.entries.find((e) => e.toStatus === "CONFIRMED");
check(confirmed, `the history records the move to CONFIRMED: ${types.join(", ")}`);
console.log(`order ${id}: ${types.join(" -> ")}`);
