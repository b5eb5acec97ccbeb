"""End-to-end check of the Python client against a running Marie.

Run by tests/test_clients.py, which starts the suite with a fake Ollama and
passes, in the environment: MARIE_ADDRESS (providers gRPC), MARIE_API_KEY,
MARIE_CHAT_MODEL, MARIE_PROMPT, MARIE_EXPECTED_REPLY, MARIE_ENDLESS_MODEL and
MARIE_PROBE_URL (a helper that reports the fake upstream's disconnects),
MARIE_RECORDER_ADDRESS (a gRPC server that records the metadata it gets)
and MARIE_ENVOY_ADDRESS (Envoy's public listener, which checks keys).
Prints one ``ok <check> <detail>`` line per check; exits non-zero on failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.memory.v1 import memory_service_pb2 as memory_pb
from marie_client import MarieClient, MarieError, pb


def probe(path: str) -> str:
    with urllib.request.urlopen(os.environ["MARIE_PROBE_URL"] + path, timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


async def main() -> None:
    env = os.environ
    async with MarieClient(env["MARIE_ADDRESS"], env["MARIE_API_KEY"]) as marie:
        models = (await marie.list_models()).models
        ids = [m.id for m in models]
        assert env["MARIE_CHAT_MODEL"] in ids, ids
        print(f"ok list_models {len(ids)}")

        model = await marie.get_model(env["MARIE_CHAT_MODEL"])
        assert model.id == env["MARIE_CHAT_MODEL"], model
        assert model.context_length > 0, model
        print(f"ok get_model {model.id} {model.context_length}")

        chunks = 0
        async with marie.stream_chat(
            env["MARIE_CHAT_MODEL"], [{"role": "user", "content": env["MARIE_PROMPT"]}]
        ) as stream:
            parts = []
            async for chunk in stream:
                chunks += 1
                parts.append(chunk.content)
        text = "".join(parts)
        assert text == env["MARIE_EXPECTED_REPLY"], text
        assert chunks > 1, chunks
        print(f"ok stream_chat {chunks} {text}")

        result = await marie.stream_chat(
            env["MARIE_CHAT_MODEL"], [{"role": "user", "content": env["MARIE_PROMPT"]}]
        ).collect()
        assert result.content == env["MARIE_EXPECTED_REPLY"], result
        assert result.finish_reason == pb.FINISH_REASON_STOP, result
        assert result.usage is not None and result.usage.total_tokens > 0, result
        print("ok collect")

        before = int(probe("/disconnects"))
        stream = marie.stream_chat(
            env["MARIE_ENDLESS_MODEL"], [{"role": "user", "content": "go on forever"}]
        )
        seen = 0
        async with stream:
            async for _chunk in stream:
                seen += 1
                if seen == 3:
                    break  # leaving `async with` cancels the call
        assert probe(f"/wait-disconnect?count={before + 1}") == "ok"
        # The channel is still good after a cancelled stream.
        await marie.get_model(env["MARIE_CHAT_MODEL"])
        print(f"ok cancel {seen}")

        try:
            async for _chunk in marie.stream_chat(
                env["MARIE_CHAT_MODEL"], [{"role": "user", "content": "hi"}], temperature=5
            ):
                pass
        except MarieError as error:
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
            assert error.reason == "INVALID_ARGUMENT", error
            assert error.field == "sampling.temperature", error.metadata
            print(f"ok invalid_argument {error.field} {error.domain}")
        else:
            raise AssertionError("a temperature of 5 was accepted")

        try:
            await marie.get_model("ollama/no-such-model:latest")
        except MarieError as missing:
            assert missing.code == grpc.StatusCode.NOT_FOUND, missing
            print(f"ok not_found {missing.reason}")
        else:
            raise AssertionError("an unknown model was found")

    # A server that records what arrives: the key must be on the wire.
    async with MarieClient(env["MARIE_RECORDER_ADDRESS"], env["MARIE_API_KEY"]) as recorded:
        try:
            await recorded.list_models()
        except MarieError as refused:
            assert refused.code == grpc.StatusCode.UNIMPLEMENTED, refused
        else:
            raise AssertionError("the recorder answered")
        # Calls that wait for a model get the long default deadline (the
        # recorder checks what arrived): the helper, and raw stubs via call().
        chat = recorded.providers.CreateChatCompletion
        model_calls = (
            recorded.create_embeddings("ollama/nomic-embed-text:latest", ["hi"]),
            recorded.call(chat, pb.CreateChatCompletionRequest()),
            recorded.call(recorded.memory.AddMemories, memory_pb.AddMemoriesRequest()),
        )
        for model_call in model_calls:
            try:
                await model_call
            except MarieError as refused:
                assert refused.code == grpc.StatusCode.UNIMPLEMENTED, refused
            else:
                raise AssertionError("the recorder answered")
        print("ok bearer")

    # Through Envoy, which lets a call pass only with a key the gateway accepts.
    async with MarieClient(env["MARIE_ENVOY_ADDRESS"], env["MARIE_API_KEY"]) as edge:
        ids = [m.id for m in (await edge.list_models()).models]
        assert env["MARIE_CHAT_MODEL"] in ids, ids
        print(f"ok envoy_models {len(ids)}")
        # The raw stub, called without the client's metadata: no key at all.
        try:
            await edge.providers.ListModels(pb.ListModelsRequest(), timeout=10)
        except grpc.aio.AioRpcError as raw:
            refused = MarieError.from_rpc_error(raw)
        else:
            raise AssertionError("Envoy let a call without a key through")
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED, refused
        # Envoy passes on the gateway's refusal with its ErrorInfo.
        assert (refused.reason, refused.domain) == ("INVALID_API_KEY", "marie"), refused
        assert refused.message.startswith("You didn't provide an API key"), refused
        print(f"ok unauthenticated {refused.code.name} {refused.reason} {refused.message}")
        # AuthService through Envoy with the key: it needs the admin scope,
        # which this key lacks (a call without the key would be UNAUTHENTICATED).
        try:
            await edge.call(edge.auth.ListApiKeys, auth_pb.ListApiKeysRequest())
        except MarieError as denied:
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED, denied
            print(f"ok auth_stub {denied.code.name}")
        else:
            raise AssertionError("a key without the admin scope listed keys")

    # MemoryService at its own address.
    async with MarieClient(env["MARIE_MEMORY_ADDRESS"], env["MARIE_API_KEY"]) as memory:
        listed = await memory.call(
            memory.memory.ListConversations,
            memory_pb.ListConversationsRequest(user_id=env["MARIE_MEMORY_USER"]),
        )
        assert list(listed.conversations) == [], listed
        print(f"ok memory_stub {len(listed.conversations)}")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
