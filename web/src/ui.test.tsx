import { act, fireEvent, render, screen } from "@testing-library/react";
import { afterEach, describe, expect, it, vi } from "vitest";
import { App } from "./App";

afterEach(() => {
  vi.restoreAllMocks();
  sessionStorage.clear();
});

describe("sign in", () => {
  it("refuses text that is not a token and offers the demo token when the server has one", async () => {
    vi.spyOn(globalThis, "fetch").mockResolvedValue(new Response(JSON.stringify({ demoToken: null })));
    render(<App />);
    fireEvent.change(screen.getByLabelText(/Bearer token/), { target: { value: "hello" } });
    fireEvent.click(screen.getByRole("button", { name: "Sign in" }));
    expect(screen.getByRole("alert").textContent).toMatch(/not a token/);
    await act(async () => {});
    expect(screen.queryByRole("button", { name: /demo admin/ })).toBeNull();
  });
});
