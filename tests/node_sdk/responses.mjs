// The official OpenAI Node SDK against Marie's Responses API. Run by
// tests/test_node_sdk.py with MARIE_BASE_URL, MARIE_API_KEY and
// MARIE_OTHER_KEY (a key of another tenant) in the environment. Prints
// "ok <check>" per check; any failure exits non-zero with the reason.
import assert from "node:assert/strict";
import OpenAI, { NotFoundError, BadRequestError } from "openai";
import { zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";

const MODEL = "ollama/llama3.2:latest";
const TOOLS = [
  {
    type: "function",
    name: "get_weather",
    description: "Weather by city",
    parameters: {
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
      additionalProperties: false,
    },
    strict: true,
  },
];

const baseURL = `${process.env.MARIE_BASE_URL}/v1`;
const client = new OpenAI({ baseURL, apiKey: process.env.MARIE_API_KEY, maxRetries: 0 });
const other = new OpenAI({ baseURL, apiKey: process.env.MARIE_OTHER_KEY, maxRetries: 0 });

function ok(check) {
  console.log(`ok ${check}`);
}

// responses.create, plain.
const plain = await client.responses.create({ model: MODEL, input: "hi from node" });
assert.match(plain.id, /^resp_/);
assert.equal(plain.object, "response");
assert.equal(plain.status, "completed");
assert.equal(plain.output_text, "Hello from llama3.2:latest! You said: hi from node");
assert.ok(plain.usage.output_tokens > 0);
ok("create");

// responses.stream: events in order, text assembled by the SDK.
const stream = client.responses.stream({ model: MODEL, input: "stream please" });
const kinds = [];
let deltas = "";
stream.on("response.output_text.delta", (e) => {
  deltas += e.delta;
});
for await (const e of stream) kinds.push(e.type);
const streamed = await stream.finalResponse();
// finalResponse() has no output_text (the SDK adds it to create() answers only).
const streamedText = streamed.output[0].content[0].text;
assert.equal(streamedText, "Hello from llama3.2:latest! You said: stream please");
assert.equal(deltas, streamedText);
assert.equal(streamed.status, "completed");
assert.deepEqual(kinds.slice(0, 4), [
  "response.created",
  "response.in_progress",
  "response.output_item.added",
  "response.content_part.added",
]);
assert.equal(kinds.at(-1), "response.completed");
ok("stream");

// Tools: function_call, then function_call_output, then the answer.
const called = await client.responses.create({
  model: "ollama/tooly:latest",
  input: "Weather in Paris from node?",
  tools: TOOLS,
});
const [call] = called.output;
assert.equal(call.type, "function_call");
assert.equal(call.name, "get_weather");
assert.deepEqual(JSON.parse(call.arguments), { city: "Paris" });
const answered = await client.responses.create({
  model: "ollama/tooly:latest",
  previous_response_id: called.id,
  input: [{ type: "function_call_output", call_id: call.call_id, output: "19C from node" }],
  tools: TOOLS,
});
assert.ok(answered.output_text.length > 0);
assert.equal(answered.output[0].type, "message");
ok("tools");

// text.format json_schema, parsed by the SDK.
const Count = z.object({ n: z.number().int(), label: z.string() });
const parsed = await client.responses.parse({
  model: MODEL,
  input: "count from node",
  text: { format: zodTextFormat(Count, "count") },
});
assert.deepEqual(parsed.output_parsed, { n: 0, label: "" });
ok("parse");

// previous_response_id continues a stored response.
const first = await client.responses.create({ model: MODEL, input: "Node says: my name is Ada." });
const second = await client.responses.create({
  model: MODEL,
  previous_response_id: first.id,
  input: "Node asks: what is my name?",
});
assert.equal(second.previous_response_id, first.id);
ok("chain");

// Retrieve, list input items, delete.
const got = await client.responses.retrieve(first.id);
assert.equal(got.output_text, first.output_text);
const items = await client.responses.inputItems.list(first.id);
assert.equal(items.data.length, 1);
assert.equal(items.data[0].content[0].text, "Node says: my name is Ada.");
await client.responses.delete(second.id);
await assert.rejects(client.responses.retrieve(second.id), NotFoundError);
ok("retrieve_list_delete");

// Another tenant's key finds nothing.
await assert.rejects(other.responses.retrieve(first.id), NotFoundError);
await assert.rejects(other.responses.inputItems.list(first.id), NotFoundError);
await assert.rejects(other.responses.delete(first.id), NotFoundError);
ok("other_tenant");

// A built-in tool is refused, naming the field.
await assert.rejects(
  client.responses.create({ model: MODEL, input: "x", tools: [{ type: "web_search" }] }),
  (err) => err instanceof BadRequestError && err.param === "tools[0].type",
);
ok("bad_request");
