/**
 * Server-sent events, parsed from a byte stream that arrives in arbitrary
 * chunks: an event (or a UTF-8 character) may be split across chunks.
 */

export interface SseEvent {
  event: string;
  data: string;
}

/** Incremental parser: feed it text, it hands back the events completed so far. */
export class SseParser {
  private buffer = "";
  private dataLines: string[] = [];
  private eventName = "";

  /** Parse `text` (the next piece of the stream); returns the events it completed. */
  push(text: string): SseEvent[] {
    this.buffer += text;
    const out: SseEvent[] = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (match === null) break;
      // A lone "\r" at the end may be the first half of "\r\n": wait for more.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line, out);
    }
    return out;
  }

  /** The end of the stream: an event not followed by a blank line is dropped (per the spec). */
  end(): SseEvent[] {
    this.buffer = "";
    this.dataLines = [];
    this.eventName = "";
    return [];
  }

  private line(line: string, out: SseEvent[]): void {
    if (line === "") {
      if (this.dataLines.length > 0) {
        out.push({ event: this.eventName || "message", data: this.dataLines.join("\n") });
      }
      this.dataLines = [];
      this.eventName = "";
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.dataLines.push(value);
    else if (field === "event") this.eventName = value;
  }
}

/**
 * Read an SSE response body to its end, calling `onData` with each event's
 * data (JSON-decoded; the `[DONE]` marker ends the stream). Throws the
 * AbortError when `signal` aborts.
 */
export async function readEvents(
  body: ReadableStream<Uint8Array>,
  onData: (data: unknown) => void,
): Promise<void> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (const ev of parser.push(done ? text + "\n\n" : text)) {
        if (ev.data === "[DONE]") return;
        onData(JSON.parse(ev.data));
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}
