import { describe, expect, it } from "vitest";
import { readEvents, SseParser } from "./sse";

function streamOf(chunks: Uint8Array[]): ReadableStream<Uint8Array> {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
}

describe("SseParser", () => {
  it("reassembles events split anywhere across chunks", () => {
    const text = 'data: {"a":1}\n\n: keep-alive\n\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n';
    // Every split point of the stream gives the same events.
    for (let cut = 0; cut <= text.length; cut++) {
      const parser = new SseParser();
      const events = [...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut))];
      expect(events.map((e) => e.data)).toEqual(['{"a":1}', '{"b":\n2}', "[DONE]"]);
    }
  });

  it("handles CRLF line ends, including a CR and LF in different chunks", () => {
    const parser = new SseParser();
    const events = [...parser.push("event: x\r\ndata: one\r"), ...parser.push("\n\r\n")];
    expect(events).toEqual([{ event: "x", data: "one" }]);
  });

  it("ignores comments and fields it does not know, and events without data", () => {
    const parser = new SseParser();
    expect(parser.push(": ping\n\nid: 3\nretry: 10\n\n")).toEqual([]);
  });
});

describe("readEvents", () => {
  it("decodes UTF-8 characters split across chunks and stops at [DONE]", async () => {
    const bytes = new TextEncoder().encode(
      'data: {"t":"héllo 👋"}\n\ndata: [DONE]\n\ndata: {"after":true}\n\n',
    );
    // Split inside the 4-byte emoji and inside the 2-byte é.
    const emoji = bytes.indexOf(0xf0);
    const chunks = [bytes.slice(0, 12), bytes.slice(12, emoji + 2), bytes.slice(emoji + 2)];
    const seen: unknown[] = [];
    await readEvents(streamOf(chunks), (d) => seen.push(d));
    expect(seen).toEqual([{ t: "héllo 👋" }]);
  });

  it("delivers a last event that the stream ends without a blank line after", async () => {
    const seen: unknown[] = [];
    await readEvents(streamOf([new TextEncoder().encode('data: {"n":1}\n')]), (d) => seen.push(d));
    expect(seen).toEqual([{ n: 1 }]);
  });
});
