// Anthropic's official TypeScript SDK against Marie's Messages API. Run by
// tests/test_anthropic_clients.py with MARIE_BASE_URL, MARIE_API_KEY,
// MARIE_LIMITED_KEY (a key allowed only another model) and MARIE_RPM_KEY (a
// key allowed one request a minute) in the environment. Prints "ok <check>"
// per check; any failure exits non-zero with the reason.
import assert from "node:assert/strict";
import Anthropic, {
  AuthenticationError,
  BadRequestError,
  InternalServerError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitError,
} from "@anthropic-ai/sdk";

const MODEL = process.env.MARIE_MODEL;
const TOOL_MODEL = process.env.MARIE_TOOL_MODEL;
const FAILING_MODEL = process.env.MARIE_FAILING_MODEL;
const baseURL = process.env.MARIE_BASE_URL;
const client = new Anthropic({ baseURL, apiKey: process.env.MARIE_API_KEY, maxRetries: 0 });
const WEATHER = {
  name: "get_weather",
  description: "Weather by city",
  input_schema: {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
  },
};

function ok(check) {
  console.log(`ok ${check}`);
}

async function rejects(promise, type, errorType) {
  try {
    await promise;
  } catch (e) {
    assert.ok(e instanceof type, `${e?.constructor?.name}: ${e?.message}`);
    assert.equal(e.error.type, "error");
    assert.equal(e.error.error.type, errorType);
    return e;
  }
  assert.fail(`expected ${type.name}`);
}

// messages.create
const message = await client.messages.create({
  model: MODEL,
  max_tokens: 64,
  system: "Be brief.",
  messages: [{ role: "user", content: "hi from node" }],
});
assert.match(message.id, /^msg_01/);
assert.equal(message.type, "message");
assert.equal(message.content[0].text, "Hello from llama3.2:latest! You said: hi from node");
assert.equal(message.stop_reason, "end_turn");
assert.ok(message.usage.input_tokens > 0 && message.usage.output_tokens > 0);
ok("create");

// messages.stream: events, the text assembled, the final message.
const stream = client.messages.stream({
  model: MODEL,
  max_tokens: 64,
  messages: [{ role: "user", content: "stream from node" }],
});
let text = "";
const kinds = [];
stream.on("text", (delta) => {
  text += delta;
});
stream.on("streamEvent", (event) => kinds.push(event.type));
const final = await stream.finalMessage();
assert.equal(text, "Hello from llama3.2:latest! You said: stream from node");
assert.equal(final.content[0].text, text);
assert.equal(kinds[0], "message_start");
assert.equal(kinds.at(-1), "message_stop");
assert.ok(final.usage.output_tokens > 0);
ok("stream");

// A tool round trip.
const asked = await client.messages.create({
  model: TOOL_MODEL,
  max_tokens: 64,
  tools: [WEATHER],
  messages: [{ role: "user", content: "weather in Paris?" }],
});
assert.equal(asked.stop_reason, "tool_use");
const call = asked.content.find((b) => b.type === "tool_use");
assert.match(call.id, /^toolu_01/);
assert.deepEqual(call.input, { city: "Paris" });
const answered = await client.messages.create({
  model: TOOL_MODEL,
  max_tokens: 64,
  tools: [WEATHER],
  messages: [
    { role: "user", content: "weather in Paris?" },
    { role: "assistant", content: asked.content },
    { role: "user", content: [{ type: "tool_result", tool_use_id: call.id, content: "21C from node" }] },
  ],
});
assert.equal(answered.stop_reason, "end_turn");
ok("tools");

// count_tokens: the fake counts the words of every message.
const counted = await client.messages.countTokens({
  model: MODEL,
  messages: [{ role: "user", content: "one two three" }],
});
assert.equal(counted.input_tokens, 3);
ok("count_tokens");

// models.list in Anthropic's shape.
const models = await client.models.list({ limit: 1000 });
assert.ok(models.data.length > 0);
assert.ok(models.data.every((m) => m.type === "model"));
ok("models");

// Every error class, from a real cause.
const noKey = new Anthropic({ baseURL, apiKey: "sk-marie-wrong", maxRetries: 0 });
const one = { max_tokens: 8, messages: [{ role: "user", content: "x" }] };
await rejects(noKey.messages.create({ model: MODEL, ...one }), AuthenticationError, "authentication_error");
const limited = new Anthropic({ baseURL, apiKey: process.env.MARIE_LIMITED_KEY, maxRetries: 0 });
await rejects(limited.messages.create({ model: MODEL, ...one }), PermissionDeniedError, "permission_error");
await rejects(client.messages.create({ model: "claude-none", ...one }), NotFoundError, "not_found_error");
const bad = await rejects(
  client.messages.create({ model: MODEL, messages: one.messages }),
  BadRequestError,
  "invalid_request_error",
);
assert.equal(bad.error.error.message, "max_tokens: Field required");
const rpm = new Anthropic({ baseURL, apiKey: process.env.MARIE_RPM_KEY, maxRetries: 0 });
await rpm.messages.create({ model: MODEL, ...one });
const limitedOut = await rejects(rpm.messages.create({ model: MODEL, ...one }), RateLimitError, "rate_limit_error");
assert.ok(Number(limitedOut.headers.get("retry-after")) >= 1);
await rejects(client.messages.create({ model: FAILING_MODEL, ...one }), InternalServerError, "api_error");
ok("errors");
