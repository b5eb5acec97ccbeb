import { describe, expect, it } from "vitest";
import { applyEvent, EMPTY_ANSWER } from "./chatStream";
import { applyCompareEvent, emptyArms } from "./compareStream";

describe("a conversation turn's events", () => {
  it("builds the answer from chunks, then keeps an error that came mid-stream", () => {
    let a = EMPTY_ANSWER;
    a = applyEvent(a, { object: "chat.completion.chunk", model: "m", choices: [{ delta: { role: "assistant" } }] });
    a = applyEvent(a, { choices: [{ delta: { content: "Hello " } }] });
    a = applyEvent(a, { choices: [{ delta: { content: "there" } }] });
    a = applyEvent(a, { error: { message: "upstream broke", code: "x" } });
    expect(a).toMatchObject({ text: "Hello there", model: "m", error: "upstream broke" });
  });

  it("records the stored message's id", () => {
    expect(applyEvent(EMPTY_ANSWER, { object: "conversation.message", id: "msg_1" }).messageId).toBe("msg_1");
  });
});

describe("comparison events", () => {
  it("keeps each model's text, latency and tokens apart", () => {
    let arms = emptyArms(["a", "b"]);
    arms = applyCompareEvent(arms, { type: "delta", index: 1, model: "b", delta: { content: "B1" } });
    arms = applyCompareEvent(arms, { type: "delta", index: 0, model: "a", delta: { content: "A1" } });
    arms = applyCompareEvent(arms, {
      type: "done",
      index: 0,
      usage: { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 },
      latency: { first_token_ms: 12.5, total_ms: 40 },
    });
    arms = applyCompareEvent(arms, { type: "error", index: 1, error: { message: "down" } });
    arms = applyCompareEvent(arms, { type: "delta", index: 7, delta: { content: "ignored" } });
    expect(arms[0]).toMatchObject({ text: "A1", done: true, firstTokenMs: 12.5, totalMs: 40, promptTokens: 3, completionTokens: 5 });
    expect(arms[1]).toMatchObject({ text: "B1", done: true, error: "down" });
  });
});
