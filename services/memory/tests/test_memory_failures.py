"""What memory does when the model or the store fails, through a real providers
service in front of the fake Ollama failing on cue: background calls travel in
the background lane; an outage pauses the queue and loses no job, however long;
a bad or looping answer is asked once more, stricter, then fails the job with
its reason (GetExtractionJob); a full store backs off and never makes the model
answer twice."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from marie.memory.v1 import memory_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as ppb_grpc
from marie_kit.channels import insecure_channel
from marie_kit.lanes import BACKGROUND, LANE_HEADER
from marie_kit.server import RunningServer, start_server
from marie_kit.tenancy import RESPONSES_USER, tenant_user_id
from marie_memory.core import MemoryCore
from marie_memory.embedding import Embeddings
from marie_memory.extraction.extractor import LlmExtractor
from marie_memory.extraction.queue import ExtractionQueue
from marie_memory.records import (
    JOB_FAILED,
    JOB_QUEUED,
    JOB_SUCCEEDED,
    AddRequest,
    MemoryFilter,
    SourceMessage,
)
from marie_memory.settings import MemorySettings
from marie_memory.stores.sqlite import SqliteStore
from marie_providers.service import ProvidersComponent
from marie_providers.settings import ProvidersSettings
from memory_testkit import EMBEDDING_MODEL, EXTRACTION_MODEL, MemoryStub, StartMemory

from tests.fakes.ollama import FakeOllama
from tests.grpc_recorder import RecordedCall, RecordingProxy
from tests.grpc_testing import rpc_error

USER = "alice"
MODEL = "llama3.2:latest"
#: The queue's attempts before this change: an outage longer than that lost every job.
OLD_ATTEMPT_BUDGET = 8


@pytest.fixture
async def patient_providers(ollama: FakeOllama, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """Providers in front of the fake Ollama, with no retries of its own and a breaker
    that never opens: every failure the fake is told to give reaches memory."""
    config = tmp_path / "marie.yaml"
    config.write_text(
        f"providers:\n  ollama: {{type: ollama, base_url: '{ollama.base_url}'}}\n"
        "routing: {retries: 0, breaker_failures: 1000}\n"
    )
    settings = ProvidersSettings(config=config, port=0, read_timeout_seconds=10)
    server = await start_server([ProvidersComponent(settings)])
    yield server
    await server.stop(0.5)


@pytest.fixture
def proxy(patient_providers: RunningServer) -> Iterator[RecordingProxy]:
    """A recording hop between memory and providers."""
    with RecordingProxy(patient_providers.target) as hop:
        yield hop


@pytest.fixture
def quick_settings(tmp_path: Path, proxy: RecordingProxy) -> MemorySettings:
    return MemorySettings(
        data_dir=tmp_path / "data",
        port=0,
        providers_addr=f"127.0.0.1:{proxy.port}",
        embedding_model=EMBEDDING_MODEL,
        extraction_model=EXTRACTION_MODEL,
        queue_poll_seconds=0.02,
        queue_backoff_seconds=0.02,
        queue_max_backoff_seconds=0.05,
    )


@pytest.fixture
async def stub(start_memory: StartMemory, quick_settings: MemorySettings) -> AsyncIterator[Any]:
    server = await start_memory(quick_settings)
    async with insecure_channel(server.target) as channel:
        from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc  # noqa: PLC0415

        yield pb_grpc.MemoryServiceStub(channel)


def _turn(text: str, **fields: Any) -> pb.AddMemoriesRequest:
    return pb.AddMemoriesRequest(
        user_id=USER,
        messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content=text)],
        **fields,
    )


async def _job(stub: MemoryStub, job_id: str) -> pb.ExtractionJob:
    reply = await stub.GetExtractionJob(pb.GetExtractionJobRequest(user_id=USER, job_id=job_id))
    return reply.job


async def _until(
    stub: MemoryStub, job_id: str, state: int, timeout: float = 10
) -> pb.ExtractionJob:
    deadline = time.monotonic() + timeout
    while True:
        job = await _job(stub, job_id)
        if job.state == state or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.02)


def _lane(call: RecordedCall) -> str | bytes | None:
    return call.header(LANE_HEADER)


async def test_background_calls_travel_in_the_background_lane_and_users_calls_do_not(
    stub: MemoryStub, proxy: RecordingProxy, ollama: FakeOllama
) -> None:
    conversation = await stub.CreateConversation(pb.CreateConversationRequest(user_id=USER))
    await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER,
            conversation_id=conversation.conversation.id,
            messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content="I grow tomatoes.")],
        )
    )
    queued = await stub.AddMemories(_turn("I am vegetarian.", background=True))
    assert (await _until(stub, queued.job_id, pb.EXTRACTION_JOB_STATE_SUCCEEDED)).state == (
        pb.EXTRACTION_JOB_STATE_SUCCEEDED
    )
    user_calls = [("x-request-id", "users-own")]
    await stub.AddMemories(_turn("I play the cello."), metadata=user_calls)
    await stub.SearchMemories(
        pb.SearchMemoriesRequest(user_id=USER, query="what do I eat"), metadata=user_calls
    )
    for _ in range(100):  # the message's vector comes in the background
        if any(b"tomatoes" in bytes(str(r.body), "utf-8") for r in ollama.embed_requests):
            break
        await asyncio.sleep(0.02)

    calls = proxy.all_calls()
    users = [c for c in calls if c.header("x-request-id") == "users-own"]
    background = [c for c in calls if c.header("x-request-id") != "users-own"]
    methods = {c.method.rsplit("/", 1)[1] for c in users}
    assert methods == {"StreamChatCompletion", "CreateEmbeddings"}
    assert all(_lane(c) is None for c in users)
    # The queued job's extraction and vectors, the message's vector: all background.
    assert {c.method.rsplit("/", 1)[1] for c in background} >= {
        "StreamChatCompletion",
        "CreateEmbeddings",
    }
    assert all(_lane(c) == BACKGROUND for c in background)


async def test_an_outage_longer_than_the_old_attempt_budget_loses_no_job(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    ollama.set_model(MODEL, status_error=(503, "server is restarting"))
    queued = [
        (await stub.AddMemories(_turn(text, background=True))).job_id
        for text in ("I live in Lyon.", "I am allergic to peanuts.")
    ]
    first = queued[0]
    job = await _job(stub, first)
    for _ in range(500):
        job = await _job(stub, first)
        if job.attempts > OLD_ATTEMPT_BUDGET + 2:
            break
        await asyncio.sleep(0.02)
    assert job.state == pb.EXTRACTION_JOB_STATE_QUEUED
    assert job.attempts > OLD_ATTEMPT_BUDGET + 2
    assert job.last_error.startswith("PROVIDER_UNAVAILABLE")
    # The queue paused: the second job waits for the first instead of failing too.
    assert (await _job(stub, queued[1])).state == pb.EXTRACTION_JOB_STATE_QUEUED

    ollama.set_model(MODEL, status_error=None)
    done = [await _until(stub, job_id, pb.EXTRACTION_JOB_STATE_SUCCEEDED) for job_id in queued]
    assert [j.state for j in done] == [pb.EXTRACTION_JOB_STATE_SUCCEEDED] * 2
    assert [[r.memory.text for r in j.results] for j in done] == [
        ["Live in Lyon"],
        ["Is allergic to peanuts"],
    ]
    assert done[0].HasField("finish_time") and not done[0].HasField("next_attempt_time")


async def test_a_bad_answer_is_asked_once_more_stricter_then_the_job_fails_saying_why(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    ollama.set_model(MODEL, replies=["not json", '{"facts": "nope"}'])
    ollama.reset()
    queued = await stub.AddMemories(_turn("I own a boat.", background=True))
    job = await _until(stub, queued.job_id, pb.EXTRACTION_JOB_STATE_FAILED)
    assert job.state == pb.EXTRACTION_JOB_STATE_FAILED
    assert job.failure_reason == "EXTRACTION_FAILED"
    assert 'no "facts" list' in job.last_error
    assert list(job.results) == []
    # Exactly two calls, the second with a smaller bound; then no more.
    await asyncio.sleep(0.2)
    calls = [r.body for r in ollama.chat_requests]
    assert len(calls) == 2
    assert calls[1]["options"]["num_predict"] < calls[0]["options"]["num_predict"]
    assert calls[1]["format"]["properties"]["facts"]["maxItems"] == 5
    listed = await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER))
    assert list(listed.memories) == []


async def test_a_looping_model_is_cut_off_at_max_tokens_and_the_job_fails_saying_so(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    loop = '{"facts": [' + ", ".join(['{"text": "I am a musician."'] * 50)
    ollama.set_model(MODEL, reply=loop, done_reason="length")
    queued = await stub.AddMemories(_turn("I am a musician.", background=True))
    job = await _until(stub, queued.job_id, pb.EXTRACTION_JOB_STATE_FAILED)
    assert job.failure_reason == "EXTRACTION_FAILED"
    assert "cut off at 400 tokens" in job.last_error
    assert len(ollama.chat_requests) == 2


async def test_a_model_the_key_may_not_use_is_refused_before_a_job_is_queued(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    # As the synchronous call is: providers is asked first, so no job is queued
    # that could only fail, and the model never hears of it.
    error = await rpc_error(
        stub.AddMemories(
            _turn("I like tea.", background=True),
            metadata=(("x-marie-allowed-models", "ollama/gemma3%3A1b"),),
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert ollama.chat_requests == []


async def test_a_job_is_found_only_by_its_own_user(stub: MemoryStub) -> None:
    queued = await stub.AddMemories(_turn("I like tea.", background=True))
    error = await rpc_error(
        stub.GetExtractionJob(pb.GetExtractionJobRequest(user_id="bob", job_id=queued.job_id))
    )
    assert (error.code, error.reason, error.metadata) == (
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
        {"job_id": queued.job_id},
    )
    error = await rpc_error(stub.GetExtractionJob(pb.GetExtractionJobRequest(user_id=USER)))
    assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "job_id")


# --- the queue over a real SQLite store, in-process ---------------------------


@pytest.fixture
async def parts(
    tmp_path: Path, patient_providers: RunningServer
) -> AsyncIterator[tuple[SqliteStore, MemoryCore, LlmExtractor]]:
    store = await SqliteStore.open(tmp_path / "memory.sqlite3")
    async with insecure_channel(patient_providers.target) as channel:
        providers = ppb_grpc.ProviderServiceStub(channel)
        extractor = LlmExtractor(providers, 10)
        core = MemoryCore(
            store,
            Embeddings(store, None, "", 10),
            extractor=extractor,
            default_extraction_model=EXTRACTION_MODEL,
        )
        yield store, core, extractor
    await store.close()


def _request(text: str) -> AddRequest:
    return AddRequest(user_id=USER, messages=(SourceMessage(2, text),))


async def _wait_state(store: SqliteStore, job_id: str, state: int) -> int:
    for _ in range(500):
        job = await store.get_job(USER, job_id)
        if job is not None and job.state == state:
            return state
        await asyncio.sleep(0.02)
    job = await store.get_job(USER, job_id)
    return job.state if job is not None else 0


class FullDisk:
    """The SQLite store, whose writes of memories and job outcomes fail on cue as
    SQLite's do on a full disk (SQLITE_FULL); everything else is the real store."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.full = True
        #: Writes of memories refused: one per attempt.
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _check(self) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")

    async def apply_memory_changes(self, user_id: str, changes: Any) -> None:
        self.refused += self.full
        self._check()
        await self._store.apply_memory_changes(user_id, changes)

    async def finish_job(self, job_id: str, **outcome: Any) -> None:
        self._check()
        await self._store.finish_job(job_id, **outcome)

    async def retry_job(self, job_id: str, next_attempt_time: float, error: str) -> None:
        self._check()
        await self._store.retry_job(job_id, next_attempt_time, error)


async def test_a_full_disk_backs_off_and_the_model_answers_only_once(
    parts: tuple[SqliteStore, MemoryCore, LlmExtractor], ollama: FakeOllama
) -> None:
    """Issue 20.3: two queued turns made 230 model calls in 40 s on a full disk."""
    store, core, extractor = parts
    disk = FullDisk(store)
    core.store = disk
    queue = ExtractionQueue(core, poll_seconds=0.02, backoff_seconds=0.05, max_backoff_seconds=0.2)
    job_id = await core.enqueue_memories(_request("I live in Lyon. I have two cats."))
    queue.start()
    try:
        await asyncio.sleep(1.0)
        job = await store.get_job(USER, job_id)
        assert job is not None and job.state == JOB_QUEUED
        assert extractor.calls == 1  # the plan is kept: the model is not asked again
        assert 2 <= disk.refused <= 12  # backed off (0.05 s doubling to 0.2 s): no hot loop
        assert await store.count_jobs() == 1

        disk.full = False  # room again
        assert await _wait_state(store, job_id, JOB_SUCCEEDED) == JOB_SUCCEEDED
        assert extractor.calls == 1
        listed, _ = await core.list_memories(USER, 10, "", MemoryFilter())
        assert sorted(m.text for m in listed) == ["Have two cats", "Live in Lyon"]
    finally:
        await queue.close()


async def test_a_job_older_than_the_age_limit_fails_as_expired(
    parts: tuple[SqliteStore, MemoryCore, LlmExtractor], ollama: FakeOllama
) -> None:
    store, core, extractor = parts
    ollama.set_model(MODEL, status_error=(503, "down for the day"))
    day_later = lambda: time.time() + 86_400 + 1  # noqa: E731
    queue = ExtractionQueue(core, poll_seconds=0.02, backoff_seconds=0.02, clock=day_later)
    job_id = await core.enqueue_memories(_request("I live in Lyon."))
    queue.start()
    try:
        assert await _wait_state(store, job_id, JOB_FAILED) == JOB_FAILED
    finally:
        await queue.close()
    job = await store.get_job(USER, job_id)
    assert job is not None and job.failure_reason == "JOB_EXPIRED"
    assert extractor.calls == 0


# --- embeddings ----------------------------------------------------------------


async def _conversation(stub: MemoryStub, user: str = USER) -> str:
    created = await stub.CreateConversation(pb.CreateConversationRequest(user_id=user))
    return str(created.conversation.id)


async def _append(stub: MemoryStub, conversation_id: str, *texts: str, user: str = USER) -> None:
    await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=user,
            conversation_id=conversation_id,
            messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content=t) for t in texts],
        )
    )


def _embedded(ollama: FakeOllama) -> list[str]:
    """Every text the fake was asked to embed, in order."""
    out: list[str] = []
    for request in ollama.embed_requests:
        value = request.body["input"]
        out += [value] if isinstance(value, str) else value
    return out


async def _settled(ollama: FakeOllama, quiet: float = 0.4) -> int:
    """Waits until the fake has had no embedding request for `quiet` seconds."""
    count = -1
    while count != len(ollama.embed_requests):
        count = len(ollama.embed_requests)
        await asyncio.sleep(quiet)
    return count


@pytest.mark.parametrize("max_chars", [100_000])
async def test_one_poison_message_among_good_ones_fails_alone_and_is_never_sent_again(
    start_memory: StartMemory,
    quick_settings: MemorySettings,
    ollama: FakeOllama,
    max_chars: int,
) -> None:
    """Issue 19: one input over the server's batch size failed the whole batch of
    every user, 70 times in 19 minutes; 1 of 21 messages got a vector."""
    ollama.set_model("nomic-embed-text:latest", max_input_chars=3000)
    settings = quick_settings.model_copy(update={"embedding_max_chars": max_chars})
    server = await start_memory(settings)
    async with insecure_channel(server.target) as channel:
        from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc  # noqa: PLC0415

        stub = pb_grpc.MemoryServiceStub(channel)
        conversation = await _conversation(stub)
        poison = "lorem ipsum " * 2000  # 24,000 characters
        good = [f"good message number {i} about topic {i}" for i in range(20)]
        await _append(stub, conversation, *good[:10], poison, *good[10:])
        calls = await _settled(ollama)
        assert calls <= 20  # split in halves down to the poison, then two shorter tries

        found = await stub.SearchMessages(
            pb.SearchMessagesRequest(
                user_id=USER, query="good message", mode=pb.SEARCH_MODE_VECTOR, page_size=100
            )
        )
        assert sorted(h.message.content for h in found.hits) == sorted(good)
        listed = await stub.ListMessages(
            pb.ListMessagesRequest(user_id=USER, conversation_id=conversation)
        )
        notes = {m.content[:12]: dict(m.metadata) for m in listed.messages}
        assert notes["lorem ipsum "] == {
            "marie_embedding": "not embedded: the embedding model refused it"
        }
        assert notes["good message"] == {}
        # Never sent again: a later message is embedded alone.
        before = len(ollama.embed_requests)  # the search's query was one more
        await _append(stub, conversation, "one more good message")
        await _settled(ollama)
        assert len(ollama.embed_requests) == before + 1
        assert _embedded(ollama)[-1] == "one more good message"


async def test_a_long_message_is_embedded_by_its_start_and_says_so(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    conversation = await _conversation(stub)
    await _append(stub, conversation, "x" * 5000)
    await _settled(ollama)
    assert [len(t) for t in _embedded(ollama) if t.startswith("x")] == [2000]
    listed = await stub.ListMessages(
        pb.ListMessagesRequest(user_id=USER, conversation_id=conversation)
    )
    assert dict(listed.messages[0].metadata) == {
        "marie_embedding": "only the first 2000 of 5000 characters are embedded"
    }


async def test_stored_responses_records_are_not_embedded(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    """The gateway keeps Responses API records as messages of the reserved end user
    `marie:responses` (marie_kit.tenancy): no route searches them."""
    records = tenant_user_id("acme", RESPONSES_USER)
    stored = await _conversation(stub, records)
    await _append(stub, stored, '{"id": "resp_1", "output": []}', user=records)
    mine = await _conversation(stub, tenant_user_id("acme", "alice"))
    await _append(stub, mine, "I like jazz.", user=tenant_user_id("acme", "alice"))
    await _settled(ollama)
    texts = _embedded(ollama)
    assert "I like jazz." in texts
    assert not any("resp_1" in t for t in texts)


async def test_a_repeated_query_is_embedded_once(stub: MemoryStub, ollama: FakeOllama) -> None:
    for _ in range(3):
        await stub.SearchMemories(pb.SearchMemoriesRequest(user_id=USER, query="favourite food"))
    assert _embedded(ollama).count("favourite food") == 1


async def test_a_slow_query_embedding_gives_keyword_results_within_the_deadline(
    stub: MemoryStub, ollama: FakeOllama
) -> None:
    """Issue 19: with a CPU embedding server, enrichment's memory lookup (a 0.3 s
    deadline) timed out on every turn. The search answers in time by keywords and
    the vector, once made, serves the next search of the same text."""
    await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=USER,
            infer=False,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content="Likes green tea")],
        )
    )
    ollama.set_model("nomic-embed-text:latest", first_byte_delay=1.0)
    request = pb.SearchMemoriesRequest(user_id=USER, query="green tea please")
    started = time.monotonic()
    found = await stub.SearchMemories(request, timeout=0.4)
    assert time.monotonic() - started < 0.4
    assert found.mode_used == pb.SEARCH_MODE_KEYWORD
    assert found.mode_note == "the query could not be embedded in time"
    assert [r.memory.text for r in found.results] == ["Likes green tea"]
    await asyncio.sleep(1.0)  # the late embedding lands in the cache
    again = await stub.SearchMemories(request, timeout=0.4)
    assert again.mode_used == pb.SEARCH_MODE_HYBRID
    assert _embedded(ollama).count("green tea please") == 1
