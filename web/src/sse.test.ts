import { describe, expect, it } from "vitest";
import { SseParser } from "./sse";

describe("SseParser", () => {
  it("reads events split across chunks anywhere, with ids and names", () => {
    const text = 'id: 1\nevent: order.created\ndata: {"version":1}\n\n: heartbeat\n\nid: 2\r\nevent: order.confirmed\r\ndata: {"version":2}\r\n\r\n';
    for (let cut = 0; cut <= text.length; cut++) {
      const parser = new SseParser();
      const events = [...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut))];
      expect(events, `cut at ${cut}`).toEqual([
        { id: "1", event: "order.created", data: '{"version":1}' },
        { id: "2", event: "order.confirmed", data: '{"version":2}' },
      ]);
    }
  });

  it("joins data lines, keeps the last id and ignores comments and unknown fields", () => {
    const parser = new SseParser();
    expect(parser.push("id: 7\ndata: a\ndata:b\nretry: 10\nwhat: x\n\n")).toEqual([{ id: "7", event: "message", data: "a\nb" }]);
    expect(parser.push(":only a comment\n\ndata: c\n\n")).toEqual([{ id: "7", event: "message", data: "c" }]);
  });

  it("gives nothing for an event not yet ended", () => {
    const parser = new SseParser();
    expect(parser.push("id: 1\ndata: x\n")).toEqual([]);
    expect(parser.push("\n")).toEqual([{ id: "1", event: "message", data: "x" }]);
  });
});
