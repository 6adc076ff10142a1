import { describe, expect, it } from "vitest";
import { readToken, withQuery } from "./api";
import { entryLabel, manualTransitions, shortId } from "./format";
import { parseHash } from "./router";

describe("format", () => {
  it("offers only the transitions a person makes", () => {
    expect(manualTransitions(["CONFIRMED", "CANCELLED"])).toEqual([]);
    expect(manualTransitions(["PROCESSING", "CANCELLED"])).toEqual(["PROCESSING"]);
    expect(manualTransitions(["DELIVERED"])).toEqual(["DELIVERED"]);
  });

  it("names timeline entries for people", () => {
    expect(entryLabel({ type: "OrderPlaced" })).toBe("Order placed");
    expect(entryLabel({ type: "SagaStepRecorded", change: { step: "PAYMENT_SUCCEEDED" } })).toBe("Payment succeeded");
    expect(entryLabel({ type: "SagaStepRecorded", change: null })).toBe("Saga step recorded");
  });

  it("shortens ids", () => {
    expect(shortId("019ab1c2-0000-7000-8000-000000000001")).toBe("019ab1c2");
    expect(shortId("abc")).toBe("abc");
  });
});

describe("api", () => {
  const jwt = (claims: object) => `e30.${btoa(JSON.stringify(claims)).replace(/=+$/, "")}.sig`;

  it("reads the subject and role of a token", () => {
    expect(readToken(` ${jwt({ sub: "ops", role: "admin" })}\n`)).toMatchObject({ subject: "ops", role: "admin" });
    expect(readToken("not a token")).toBeNull();
    expect(readToken(jwt({ sub: "x" }))).toBeNull();
  });

  it("builds queries without empty values", () => {
    expect(withQuery("/api/v1/orders", { status: "", limit: 20, cursor: undefined, customerId: "a b" })).toBe(
      "/api/v1/orders?limit=20&customerId=a+b",
    );
    expect(withQuery("/x", {})).toBe("/x");
  });
});

describe("router", () => {
  it("parses the hash", () => {
    expect(parseHash("").path).toBe("/orders");
    const route = parseHash("#/orders/019a?customerId=c1");
    expect(route.parts).toEqual(["orders", "019a"]);
    expect(route.query.get("customerId")).toBe("c1");
  });
});
