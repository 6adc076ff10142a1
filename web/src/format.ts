// How the console shows values.
import type { Status } from "./api";

/** `2026-12-07T10:00:00.123456Z` as the reader's local date and time, to the second. */
export function formatTime(iso: string | null | undefined): string {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
}

/** An amount with its currency: `114.85 USD`. Amounts stay strings (decimals, not floats). */
export function money(amount: string, currency: string): string {
  return `${amount} ${currency}`;
}

/** The first 8 characters of an id, enough to tell orders apart on screen. */
export function shortId(id: string): string {
  return id.length > 8 ? id.slice(0, 8) : id;
}

/** What a status button says. */
export function statusAction(status: Status): string {
  switch (status) {
    case "PROCESSING":
      return "Start processing";
    case "SHIPPED":
      return "Mark shipped";
    case "DELIVERED":
      return "Mark delivered";
    case "CANCELLED":
      return "Cancel order";
    case "CONFIRMED":
      return "Confirm";
    default:
      return status;
  }
}

/**
 * The transitions a person may ask for from the order page: the transition table's next
 * states, except CONFIRMED (the saga confirms an order once its stock and payment are in) and
 * CANCELLED (the cancel button, with a reason).
 */
export function manualTransitions(allowed: Status[]): Status[] {
  return allowed.filter((s) => s !== "CONFIRMED" && s !== "CANCELLED");
}

/** A timeline entry for people: `OrderPlaced` as `Order placed`, a saga step by its name. */
export function entryLabel(entry: { type: string; change?: unknown }): string {
  const step = (entry.change as { step?: unknown } | null)?.step;
  const words =
    entry.type === "SagaStepRecorded" && typeof step === "string"
      ? step.toLowerCase().replace(/_/g, " ")
      : entry.type.replace(/([a-z])([A-Z])/g, "$1 $2").toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}
