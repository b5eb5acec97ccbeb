// The official OpenAI Node SDK against Marie's /v1/completions: plain, a list
// of prompts, streaming with usage, echo and stop. Prints one JSON object of
// what the SDK returned; tests/test_e2e_completions.py checks it.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.MARIE_BASE_URL,
  apiKey: process.env.MARIE_API_KEY,
  maxRetries: 0,
});
const model = process.env.MARIE_MODEL;

const plain = await client.completions.create({ model, prompt: "Once upon", max_tokens: 20 });
const list = await client.completions.create({ model, prompt: ["one", "two"] });
const stream = await client.completions.create({
  model,
  prompt: "streamed",
  stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
let finish = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    streamed += choice.text;
    finish = choice.finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
const echo = await client.completions.create({ model, prompt: "Echo.", echo: true });
const stop = await client.completions.create({ model, prompt: "hey", stop: ["! You"] });

console.log(
  JSON.stringify({
    plain: { id: plain.id, object: plain.object, text: plain.choices[0].text, usage: plain.usage },
    list: list.choices.map((c) => [c.index, c.text]),
    streamed: { text: streamed, finish, usage },
    echo: echo.choices[0].text,
    stop: [stop.choices[0].text, stop.choices[0].finish_reason],
  }),
);
