// Server-sent events read with fetch (EventSource cannot send the Authorization header),
// resumed with Last-Event-ID after a dropped connection.
import type { HistoryEntry, Session } from "./api";

export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

/** Turns the text of an event stream, chunk by chunk, into events (the WHATWG rules). */
export class SseParser {
  private buffer = "";
  private id: string | undefined;
  private event = "";
  private data: string[] = [];

  push(chunk: string): SseEvent[] {
    this.buffer += chunk;
    const out: SseEvent[] = [];
    let newline: number;
    while ((newline = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, newline);
      const width = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      // A lone \r at the end may be the first half of \r\n: wait for the next chunk.
      if (width === 1 && this.buffer[newline] === "\r" && newline === this.buffer.length - 1) break;
      this.buffer = this.buffer.slice(newline + width);
      if (line === "") {
        if (this.data.length > 0) {
          out.push({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
        }
        this.event = "";
        this.data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id" && !value.includes("\0")) this.id = value;
    }
    return out;
  }
}

/**
 * Follows one order's events until `signal` aborts: every entry of its history from the one
 * after `after`, then each change as it commits. Reconnects after a dropped connection with
 * the last id seen, so nothing is missed or repeated.
 */
export async function followOrder(
  session: Session,
  orderId: string,
  after: number,
  onEntry: (entry: HistoryEntry) => void,
  signal: AbortSignal,
  onState: (state: "live" | "reconnecting") => void = () => {},
): Promise<void> {
  let last = after;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers: Record<string, string> = {
        authorization: `Bearer ${session.token}`,
        accept: "text/event-stream",
      };
      if (last > 0) headers["last-event-id"] = String(last);
      const response = await fetch(`/api/v1/orders/${encodeURIComponent(orderId)}/events`, { headers, signal });
      if (!response.ok || !response.body) {
        // 404 (not this caller's order) or 422 will not get better by retrying.
        if (response.status >= 400 && response.status < 500 && response.status !== 429) return;
        throw new Error(`HTTP ${response.status}`);
      }
      onState("live");
      delay = 500;
      const parser = new SseParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const event of parser.push(value)) {
          const entry = JSON.parse(event.data) as HistoryEntry;
          if (entry.version > last) {
            last = entry.version;
            onEntry(entry);
          }
        }
      }
    } catch {
      if (signal.aborted) return;
    }
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10_000);
  }
}
