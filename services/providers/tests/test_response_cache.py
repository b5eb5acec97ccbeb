"""The response cache over real gRPC, a real SQLite file and the fake Ollama
(which records every upstream request): what is answered from the cache,
for whom, and what is never stored."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.cache import responses
from marie_providers.settings import ProvidersSettings
from prometheus_client import REGISTRY
from providers_testkit import Service, chat, running_service, stream_outcome

from tests.fakes.ollama import FakeOllama
from tests.grpc_testing import rpc_error

LLAMA = "ollama/llama3.2:latest"
EMBED = "ollama/nomic-embed-text:latest"
USE = pb.CachePolicy(mode=pb.CACHE_MODE_USE)
WEATHER_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def owner(name: str, key_id: str = "key-1") -> tuple[tuple[str, str], ...]:
    """The identity the gateway (or Envoy's key check) sends with a call."""
    return (("x-marie-key-id", key_id), ("x-marie-owner", name))


TEAM_A = owner("team-a")
TEAM_B = owner("team-b", "key-2")


def lookups(operation: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "marie_providers_cache_lookups_total", {"operation": operation, "result": result}
    )
    return value or 0.0


async def stream(
    service: Service,
    request: pb.StreamChatCompletionRequest,
    metadata: tuple[tuple[str, str], ...] = TEAM_A,
) -> list[pb.StreamChatCompletionResponse]:
    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(request, metadata=metadata, timeout=10)
    )
    assert error is None, error
    return chunks


async def stored(service: Service) -> None:
    """Let the background store of the last answer finish."""
    await asyncio.sleep(0.2)


def text(chunks: list[pb.StreamChatCompletionResponse]) -> str:
    return "".join(c.content for c in chunks)


@pytest.fixture
async def service(settings: ProvidersSettings, fake: FakeOllama) -> AsyncIterator[Service]:
    async with running_service(settings) as running:
        fake.reset()
        yield running


async def test_a_repeated_chat_is_answered_from_the_cache_without_an_upstream_call(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="The sky is blue.", chunk_delay=0.01, eval_count=4)
    hits = lookups("chat", "hit")

    first = await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    second = await stream(service, chat(LLAMA, cache=USE))

    assert len(fake.chat_requests) == 1
    assert first[0].cache == pb.CACHE_RESULT_MISS
    assert all(c.cache == pb.CACHE_RESULT_HIT for c in second)
    assert text(second) == text(first) == "The sky is blue."
    # Replayed as the stream it was, usage included; under a new id.
    assert len(second) == len(first)
    assert second[-1].usage == first[-1].usage
    assert second[-1].finish_reason == pb.FINISH_REASON_STOP
    assert {c.id for c in second} != {c.id for c in first}
    assert len({c.id for c in second}) == 1
    assert second[0].created >= first[0].created
    assert second[0].model == LLAMA
    assert lookups("chat", "hit") == hits + 1


async def test_a_streamed_answer_serves_a_whole_reply_request_and_the_other_way(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="One two three four.", chunk_delay=0.01)
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)

    whole = await service.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(chat=chat(LLAMA, cache=USE)), metadata=TEAM_A
    )

    (chunk,) = whole.chunks
    assert chunk.content == "One two three four."
    assert chunk.cache == pb.CACHE_RESULT_HIT
    assert chunk.finish_reason == pb.FINISH_REASON_STOP
    assert len(fake.chat_requests) == 1


async def test_tool_calls_replay_as_they_came(service: Service, fake: FakeOllama) -> None:
    fake.set_model("llama3.2:latest", tool_calls=[WEATHER_CALL])
    first = await service.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(chat=chat(LLAMA, cache=USE)), metadata=TEAM_A
    )
    await stored(service)
    second = await service.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(chat=chat(LLAMA, cache=USE)), metadata=TEAM_A
    )

    calls = [(t.name, t.arguments) for c in second.chunks for t in c.tool_calls]
    assert calls == [(t.name, t.arguments) for c in first.chunks for t in c.tool_calls]
    assert calls and calls[0][0] == "get_weather"
    assert second.chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert len(fake.chat_requests) == 1


async def test_another_owner_asking_the_same_never_gets_the_first_owners_answer(
    service: Service, fake: FakeOllama
) -> None:
    await stream(service, chat(LLAMA, cache=USE), TEAM_A)
    await stored(service)

    other = await stream(service, chat(LLAMA, cache=USE), TEAM_B)

    assert other[0].cache == pb.CACHE_RESULT_MISS
    assert len(fake.chat_requests) == 2


async def test_a_call_naming_no_caller_never_uses_the_cache(
    service: Service, fake: FakeOllama
) -> None:
    for _ in range(2):
        chunks = await stream(service, chat(LLAMA, cache=USE), ())
        await stored(service)
        assert chunks[0].cache == pb.CACHE_RESULT_UNSPECIFIED
    assert len(fake.chat_requests) == 2


async def test_chat_is_not_cached_unless_asked(service: Service, fake: FakeOllama) -> None:
    for _ in range(2):
        chunks = await stream(service, chat(LLAMA))
        await stored(service)
        assert chunks[0].cache == pb.CACHE_RESULT_UNSPECIFIED
    assert len(fake.chat_requests) == 2


async def test_what_changes_the_answer_changes_the_key(service: Service, fake: FakeOllama) -> None:
    base = chat(LLAMA, cache=USE)
    await stream(service, base)
    await stored(service)
    warmer = chat(LLAMA, cache=USE)
    warmer.sampling.temperature = 0.5
    other_message = chat(LLAMA, pb.ChatMessage(role=pb.ROLE_USER, content="hi here"), cache=USE)
    for request in (warmer, other_message):
        assert (await stream(service, request))[0].cache == pb.CACHE_RESULT_MISS
    # What does not change it: the end-user id, the completion id.
    same = chat(LLAMA, cache=USE, user="someone", completion_id="chatcmpl-mine")
    assert (await stream(service, same))[0].cache == pb.CACHE_RESULT_HIT
    assert len(fake.chat_requests) == 3


async def test_no_cache_revalidates_and_stores_the_fresh_answer(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="old")
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    fake.set_model("llama3.2:latest", reply="new")

    fresh = await stream(service, chat(LLAMA, cache=pb.CachePolicy(mode=pb.CACHE_MODE_REFRESH)))
    await stored(service)
    after = await stream(service, chat(LLAMA, cache=USE))

    assert (text(fresh), fresh[0].cache) == ("new", pb.CACHE_RESULT_MISS)
    assert (text(after), after[0].cache) == ("new", pb.CACHE_RESULT_HIT)
    assert len(fake.chat_requests) == 2


async def test_no_store_neither_looks_up_nor_stores(service: Service, fake: FakeOllama) -> None:
    fake.set_model("llama3.2:latest", reply="old")
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    fake.set_model("llama3.2:latest", reply="new")

    bypass = await stream(service, chat(LLAMA, cache=pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)))
    await stored(service)
    after = await stream(service, chat(LLAMA, cache=USE))

    assert (text(bypass), bypass[0].cache) == ("new", pb.CACHE_RESULT_UNSPECIFIED)
    assert (text(after), after[0].cache) == ("old", pb.CACHE_RESULT_HIT)


async def test_an_answer_older_than_the_callers_max_age_is_not_used(
    service: Service, fake: FakeOllama
) -> None:
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    await asyncio.sleep(1.1)

    young = chat(LLAMA, cache=pb.CachePolicy(mode=pb.CACHE_MODE_USE, max_age_seconds=1))
    assert (await stream(service, young))[0].cache == pb.CACHE_RESULT_MISS
    assert len(fake.chat_requests) == 2


async def test_an_error_is_never_cached(service: Service, fake: FakeOllama) -> None:
    fake.set_model("llama3.2:latest", error_after=1, chunk_delay=0.01)
    _, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, cache=USE), metadata=TEAM_A, timeout=10)
    )
    assert error is not None
    await stored(service)
    fake.set_model("llama3.2:latest", error_after=None, reply="fine")

    after = await stream(service, chat(LLAMA, cache=USE))

    assert (text(after), after[0].cache) == ("fine", pb.CACHE_RESULT_MISS)


async def test_a_stream_the_caller_leaves_is_never_cached(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="a b c d e f g h", chunk_delay=0.05)
    call = service.stub.StreamChatCompletion(chat(LLAMA, cache=USE), metadata=TEAM_A, timeout=10)
    async for _ in call:
        call.cancel()
        break
    await asyncio.sleep(0.6)
    fake.set_model("llama3.2:latest", reply="whole", chunk_delay=0)

    after = await stream(service, chat(LLAMA, cache=USE))

    assert (text(after), after[0].cache) == ("whole", pb.CACHE_RESULT_MISS)


async def test_embeddings_are_cached_by_default(service: Service, fake: FakeOllama) -> None:
    request = pb.CreateEmbeddingsRequest(model=EMBED, inputs=["one", "two"])
    first = await service.stub.CreateEmbeddings(request, metadata=TEAM_A)
    await stored(service)
    second = await service.stub.CreateEmbeddings(request, metadata=TEAM_A)
    other = await service.stub.CreateEmbeddings(request, metadata=TEAM_B)

    assert (first.cache, second.cache, other.cache) == (
        pb.CACHE_RESULT_MISS,
        pb.CACHE_RESULT_HIT,
        pb.CACHE_RESULT_MISS,
    )
    assert list(second.embeddings) == list(first.embeddings)
    assert second.usage == first.usage
    assert len(fake.requests_to("/api/embed")) == 2


async def test_no_store_turns_the_embeddings_default_off(
    service: Service, fake: FakeOllama
) -> None:
    request = pb.CreateEmbeddingsRequest(
        model=EMBED, inputs=["one"], cache=pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)
    )
    for _ in range(2):
        reply = await service.stub.CreateEmbeddings(request, metadata=TEAM_A)
        await stored(service)
        assert reply.cache == pb.CACHE_RESULT_UNSPECIFIED
    assert len(fake.requests_to("/api/embed")) == 2


async def test_text_completions_are_cached_when_asked(service: Service, fake: FakeOllama) -> None:
    request = pb.StreamCompletionRequest(model=LLAMA, prompt="Once upon", echo=True, cache=USE)
    first = [c async for c in service.stub.StreamCompletion(request, metadata=TEAM_A)]
    await stored(service)
    second = [c async for c in service.stub.StreamCompletion(request, metadata=TEAM_A)]

    assert "".join(c.text for c in second) == "".join(c.text for c in first)
    assert second[0].text.startswith("Once upon")
    assert (first[0].cache, second[0].cache) == (pb.CACHE_RESULT_MISS, pb.CACHE_RESULT_HIT)
    assert second[0].id.startswith("cmpl-") and second[0].id != first[0].id
    assert len(fake.requests_to("/api/generate")) == 1


async def test_a_key_not_allowed_the_model_gets_no_cached_answer(
    service: Service, fake: FakeOllama
) -> None:
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    narrow = (*TEAM_A, ("x-marie-allowed-models", "ollama/nomic-embed-text"))

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, cache=USE), metadata=narrow, timeout=10)
    )

    assert chunks == []
    assert error is not None and error.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_negative_max_age_is_invalid_argument(service: Service) -> None:
    bad = chat(LLAMA, cache=pb.CachePolicy(mode=pb.CACHE_MODE_USE, max_age_seconds=-1))
    error = await rpc_error(
        service.stub.CreateChatCompletion(pb.CreateChatCompletionRequest(chat=bad))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == "cache.max_age_seconds"


async def test_an_answer_past_the_ttl_is_not_used(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    short = settings.model_copy(update={"cache_ttl_seconds": 0.5})
    async with running_service(short) as service:
        fake.reset()
        await stream(service, chat(LLAMA, cache=USE))
        await stored(service)
        await asyncio.sleep(0.6)
        assert (await stream(service, chat(LLAMA, cache=USE)))[0].cache == pb.CACHE_RESULT_MISS


async def test_the_cache_outlives_a_restart(settings: ProvidersSettings, fake: FakeOllama) -> None:
    async with running_service(settings) as service:
        await stream(service, chat(LLAMA, cache=USE))
    async with running_service(settings) as service:
        fake.reset()
        assert (await stream(service, chat(LLAMA, cache=USE)))[0].cache == pb.CACHE_RESULT_HIT
        assert fake.chat_requests == []


async def test_the_cache_can_be_turned_off(settings: ProvidersSettings, fake: FakeOllama) -> None:
    off = settings.model_copy(update={"cache_store": "off"})
    async with running_service(off) as service:
        fake.reset()
        for _ in range(2):
            chunks = await stream(service, chat(LLAMA, cache=USE))
            assert chunks[0].cache == pb.CACHE_RESULT_UNSPECIFIED
        assert len(fake.chat_requests) == 2


async def test_chat_by_default_caches_only_temperature_zero(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    on = settings.model_copy(update={"cache_chat_by_default": True})
    greedy = chat(LLAMA)
    greedy.sampling.temperature = 0
    warm = chat(LLAMA)
    warm.sampling.temperature = 0.7
    async with running_service(on) as service:
        fake.reset()
        results = []
        for request in (greedy, greedy, warm, warm, chat(LLAMA)):
            results.append((await stream(service, request))[0].cache)
            await stored(service)
    assert results == [
        pb.CACHE_RESULT_MISS,
        pb.CACHE_RESULT_HIT,
        pb.CACHE_RESULT_UNSPECIFIED,
        pb.CACHE_RESULT_UNSPECIFIED,
        pb.CACHE_RESULT_UNSPECIFIED,
    ]


async def test_a_store_that_does_not_answer_is_a_miss_within_the_lookup_timeout(
    settings: ProvidersSettings, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(responses, "CLOSE_WAIT_SECONDS", 0.2)
    # An OpenSearch address where a listener accepts and never answers.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = settings.model_copy(
        update={
            "cache_store": "opensearch",
            "opensearch_url": f"http://127.0.0.1:{port}",
            "cache_lookup_timeout_seconds": 0.3,
        }
    )
    try:
        async with running_service(silent) as service:
            fake.reset()
            errors = lookups("chat", "error")
            started = time.monotonic()
            chunks = await stream(service, chat(LLAMA, cache=USE))
            took = time.monotonic() - started
    finally:
        server.close()
    assert chunks[0].cache == pb.CACHE_RESULT_MISS
    assert text(chunks)
    assert took < 2.0
    assert lookups("chat", "error") == errors + 1
    # The answer's write to the silent store was given up when the service
    # closed, not left running against a closed client.
    assert [t for t in asyncio.all_tasks() if t.get_name() == "cache-store"] == []


async def test_an_unreadable_entry_is_a_miss(
    service: Service, fake: FakeOllama, settings: ProvidersSettings
) -> None:
    await stream(service, chat(LLAMA, cache=USE))
    await stored(service)
    db = sqlite3.connect(settings.cache_file)
    with db:
        db.execute("UPDATE cache_entries SET body = x'ffffffff'")
    db.close()

    after = await stream(service, chat(LLAMA, cache=USE))

    assert after[0].cache == pb.CACHE_RESULT_MISS
    assert text(after)
    assert len(fake.chat_requests) == 2
