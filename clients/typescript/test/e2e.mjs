// End-to-end check of the TypeScript client against a running Marie, run by
// tests/test_clients.py after `npm run build` (see that module for the
// environment it passes). Prints one `ok <check> <detail>` line per check;
// any failure throws, and the process exits non-zero.

import assert from "node:assert/strict";

import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { Code, FinishReason, MarieClient, MarieError, collectChat, pb } from "../dist/index.js";

const env = process.env;

async function probe(path) {
  const reply = await fetch(env.MARIE_PROBE_URL + path);
  return reply.text();
}

const marie = new MarieClient({ address: env.MARIE_ADDRESS, apiKey: env.MARIE_API_KEY });
try {
  const { models } = await marie.listModels();
  const ids = models.map((m) => m.id);
  assert.ok(ids.includes(env.MARIE_CHAT_MODEL), String(ids));
  console.log(`ok list_models ${ids.length}`);

  const model = await marie.getModel(env.MARIE_CHAT_MODEL);
  assert.equal(model.id, env.MARIE_CHAT_MODEL);
  assert.ok(model.contextLength > 0);
  console.log(`ok get_model ${model.id} ${model.contextLength}`);

  const messages = [{ role: "user", content: env.MARIE_PROMPT }];
  let chunks = 0;
  let text = "";
  for await (const chunk of marie.streamChat({ model: env.MARIE_CHAT_MODEL, messages })) {
    chunks += 1;
    text += chunk.content;
  }
  assert.equal(text, env.MARIE_EXPECTED_REPLY);
  assert.ok(chunks > 1, `${chunks} chunks`);
  console.log(`ok stream_chat ${chunks} ${text}`);

  const result = await collectChat(marie.streamChat({ model: env.MARIE_CHAT_MODEL, messages }));
  assert.equal(result.content, env.MARIE_EXPECTED_REPLY);
  assert.equal(result.finishReason, FinishReason.STOP);
  assert.ok(result.usage && result.usage.totalTokens > 0);
  console.log("ok collect");

  // Cancel by leaving the loop, then by an AbortSignal: each reaches the upstream.
  let before = Number(await probe("/disconnects"));
  let seen = 0;
  for await (const _chunk of marie.streamChat({
    model: env.MARIE_ENDLESS_MODEL,
    messages: [{ role: "user", content: "go on forever" }],
  })) {
    seen += 1;
    if (seen === 3) break;
  }
  assert.equal(await probe(`/wait-disconnect?count=${before + 1}`), "ok");
  before = Number(await probe("/disconnects"));
  const abort = new AbortController();
  let aborted;
  try {
    for await (const _chunk of marie.streamChat(
      { model: env.MARIE_ENDLESS_MODEL, messages: [{ role: "user", content: "again" }] },
      { signal: abort.signal },
    )) {
      abort.abort();
    }
  } catch (error) {
    aborted = error;
  }
  assert.ok(aborted instanceof MarieError, String(aborted));
  assert.equal(aborted.code, Code.Canceled);
  assert.equal(await probe(`/wait-disconnect?count=${before + 1}`), "ok");
  await marie.getModel(env.MARIE_CHAT_MODEL); // the session survives
  console.log(`ok cancel ${seen}`);

  try {
    for await (const _chunk of marie.streamChat({
      model: env.MARIE_CHAT_MODEL,
      messages: [{ role: "user", content: "hi" }],
      temperature: 5,
    })) {
      // nothing arrives
    }
    assert.fail("a temperature of 5 was accepted");
  } catch (error) {
    assert.ok(error instanceof MarieError, String(error));
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_ARGUMENT");
    assert.equal(error.field, "sampling.temperature");
    console.log(`ok invalid_argument ${error.field} ${error.domain}`);
  }

  try {
    await marie.getModel("ollama/no-such-model:latest");
    assert.fail("an unknown model was found");
  } catch (error) {
    assert.ok(error instanceof MarieError, String(error));
    assert.equal(error.code, Code.NotFound);
    console.log(`ok not_found ${error.reason}`);
  }
} finally {
  marie.close();
}

// A server that records what arrives: the key must be on the wire.
const recorded = new MarieClient({ address: env.MARIE_RECORDER_ADDRESS, apiKey: env.MARIE_API_KEY });
try {
  await recorded.listModels();
  assert.fail("the recorder answered");
} catch (error) {
  assert.ok(error instanceof MarieError, String(error));
  assert.equal(error.code, Code.Unimplemented);
  // Calls that wait for a model get the long default deadline (the recorder
  // checks what arrived): the helper, and the generated clients.
  const unimplemented = (refused) => MarieError.from(refused).code === Code.Unimplemented;
  await assert.rejects(
    recorded.createEmbeddings({ model: "ollama/nomic-embed-text:latest", inputs: ["hi"] }),
    unimplemented,
  );
  await assert.rejects(recorded.providers.createChatCompletion({}), unimplemented);
  await assert.rejects(recorded.memory.addMemories({}), unimplemented);
  console.log("ok bearer");
} finally {
  recorded.close();
}

// Through Envoy, which lets a call pass only with a key the gateway accepts.
const edge = new MarieClient({ address: env.MARIE_ENVOY_ADDRESS, apiKey: env.MARIE_API_KEY });
try {
  const { models } = await edge.listModels();
  assert.ok(models.some((m) => m.id === env.MARIE_CHAT_MODEL));
  console.log(`ok envoy_models ${models.length}`);
  // AuthService through Envoy with the key: it needs the admin scope, which
  // this key lacks (a call without the key would be Unauthenticated).
  try {
    await edge.auth.listApiKeys({}, { timeoutMs: 10_000 });
    assert.fail("a key without the admin scope listed keys");
  } catch (raw) {
    const denied = MarieError.from(raw);
    assert.equal(denied.code, Code.PermissionDenied, String(raw));
    console.log(`ok auth_stub ${denied.codeName}`);
  }
} finally {
  edge.close();
}

// MemoryService at its own address.
const memory = new MarieClient({ address: env.MARIE_MEMORY_ADDRESS, apiKey: env.MARIE_API_KEY });
try {
  const listed = await memory.memory.listConversations(
    { userId: env.MARIE_MEMORY_USER },
    { timeoutMs: 10_000 },
  );
  assert.equal(listed.conversations.length, 0);
  console.log(`ok memory_stub ${listed.conversations.length}`);
} finally {
  memory.close();
}
// The generated client on a transport without the key: no key at all.
const bare = createClient(
  pb.ProviderService,
  createGrpcTransport({ baseUrl: `http://${env.MARIE_ENVOY_ADDRESS}` }),
);
try {
  await bare.listModels({}, { timeoutMs: 10_000 });
  assert.fail("Envoy let a call without a key through");
} catch (raw) {
  const refused = MarieError.from(raw);
  assert.equal(refused.code, Code.Unauthenticated);
  // Envoy passes on the gateway's refusal with its ErrorInfo.
  assert.equal(refused.reason, "INVALID_API_KEY");
  assert.equal(refused.domain, "marie");
  assert.ok(refused.rawMessage.startsWith("You didn't provide an API key"), refused.rawMessage);
  console.log(`ok unauthenticated ${refused.codeName} ${refused.reason} ${refused.rawMessage}`);
}
