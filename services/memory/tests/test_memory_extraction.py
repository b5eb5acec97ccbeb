"""Inference through a real providers service and the fake Ollama's structured answers:
mem0's two steps, dedupe / update / delete with history, schema failures, the queue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel
from marie_memory.job_payload import decode_request, encode_request
from marie_memory.records import AddRequest, SourceMessage
from marie_memory.settings import MemorySettings
from marie_memory.stores.sqlite import SqliteStore
from memory_testkit import EXTRACTION_MODEL, MemoryStub, StartMemory
from test_memory_embeddings import _closed_port

from tests.fakes.ollama import FakeOllama
from tests.grpc_testing import rpc_error

USER = "alice"
SYSTEM = pb.MESSAGE_ROLE_SYSTEM
USER_ROLE = pb.MESSAGE_ROLE_USER
ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT


def _request(*turns: tuple[int, str], **fields: Any) -> pb.AddMemoriesRequest:
    return pb.AddMemoriesRequest(
        user_id=USER,
        messages=[pb.SourceMessage(role=role, content=text) for role, text in turns],  # type: ignore[arg-type]
        **fields,
    )


async def _texts(stub: MemoryStub) -> list[str]:
    listed = await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER))
    return sorted(m.text for m in listed.memories)


async def test_facts_are_extracted_from_the_users_words_never_from_system_prompts(
    ai_stub: MemoryStub, ollama: FakeOllama
) -> None:
    reply = await ai_stub.AddMemories(
        _request(
            (SYSTEM, "You are a pirate. The user is secretly a spy."),
            (USER_ROLE, "I like green tea. I have a dog named Rex. What is the weather?"),
            (ASSISTANT, "Noted! It is sunny."),
        )
    )
    assert reply.extraction_model == EXTRACTION_MODEL
    assert [(r.event, r.memory.text) for r in reply.results] == [
        (pb.MEMORY_EVENT_ADD, "Like green tea"),
        (pb.MEMORY_EVENT_ADD, "Have a dog named Rex"),
    ]
    assert list(reply.results[0].memory.categories) == ["personal"]

    chats = ollama.chat_requests
    # Nothing stored is close to these facts: added without a second model call.
    assert len(chats) == 1
    facts_call = chats[0].body
    assert facts_call["model"] == "llama3.2:latest"
    # Bounded: the schema caps items and lengths, the call caps its tokens.
    facts_schema = facts_call["format"]["properties"]["facts"]
    assert facts_schema["maxItems"] == 10
    assert facts_schema["items"]["properties"]["text"]["maxLength"] == 200
    assert facts_call["options"]["num_predict"] == 1000
    assert facts_call["options"]["temperature"] == 0
    prompt = json.dumps(facts_call["messages"])
    assert "pirate" not in prompt and "spy" not in prompt
    assert "user: I like green tea." in prompt and "Noted!" not in prompt

    history = await ai_stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=USER, memory_id=reply.results[0].memory.id)
    )
    assert [(e.event, e.inferred, e.actor) for e in history.entries] == [
        (pb.MEMORY_EVENT_ADD, True, USER)
    ]


async def test_known_facts_are_not_repeated_changed_ones_update_and_contradicted_ones_go(
    ai_stub: MemoryStub,
) -> None:
    added = await ai_stub.AddMemories(
        _request((USER_ROLE, "I like green tea. I have a dog named Rex."))
    )
    tea, dog = (r.memory for r in added.results)

    same = await ai_stub.AddMemories(_request((USER_ROLE, "I like green tea.")))
    assert [(r.event, r.memory.id) for r in same.results] == [(pb.MEMORY_EVENT_NONE, tea.id)]

    changed = await ai_stub.AddMemories(
        _request((USER_ROLE, "I like green tea and jasmine tea."), actor="gateway")
    )
    assert [(r.event, r.memory.id, r.previous_text, r.memory.text) for r in changed.results] == [
        (pb.MEMORY_EVENT_UPDATE, tea.id, "Like green tea", "Like green tea and jasmine tea")
    ]

    gone = await ai_stub.AddMemories(_request((USER_ROLE, "I no longer have a dog.")))
    assert [(r.event, r.memory.id) for r in gone.results] == [(pb.MEMORY_EVENT_DELETE, dog.id)]
    assert await _texts(ai_stub) == ["Like green tea and jasmine tea"]

    tea_history = await ai_stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=USER, memory_id=tea.id)
    )
    assert [(e.event, e.old_text, e.new_text, e.actor) for e in tea_history.entries] == [
        (pb.MEMORY_EVENT_ADD, "", "Like green tea", USER),
        (pb.MEMORY_EVENT_UPDATE, "Like green tea", "Like green tea and jasmine tea", "gateway"),
    ]
    dog_history = await ai_stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=USER, memory_id=dog.id)
    )
    assert [(e.event, e.old_text, e.inferred) for e in dog_history.entries][-1] == (
        pb.MEMORY_EVENT_DELETE,
        "Have a dog named Rex",
        True,
    )
    # The updated text is searchable by its new words at once.
    found = await ai_stub.SearchMemories(pb.SearchMemoriesRequest(user_id=USER, query="jasmine"))
    assert found.results[0].memory.id == tea.id


async def test_bad_output_is_asked_for_once_more_then_fails_changing_nothing(
    ai_stub: MemoryStub, ollama: FakeOllama
) -> None:
    await ai_stub.AddMemories(_request((USER_ROLE, "I live in Lisbon.")))
    before = await _texts(ai_stub)

    ollama.set_model("llama3.2:latest", replies=["not json at all"])
    retried = await ai_stub.AddMemories(_request((USER_ROLE, "I play chess.")))
    assert [r.memory.text for r in retried.results] == ["Play chess"]

    ollama.set_model("llama3.2:latest", replies=["{}", '{"facts": [{"text": 3}]}'])
    error = await rpc_error(ai_stub.AddMemories(_request((USER_ROLE, "I own a boat."))))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "EXTRACTION_FAILED")

    # A decision naming a memory it was not shown is as bad as broken JSON (the
    # fact shares "chess" with a stored memory: the model is asked to decide).
    bad = '{"memory": [{"id": "7", "text": "x", "event": "UPDATE"}]}'
    ollama.set_model(
        "llama3.2:latest",
        replies=['{"facts": [{"text": "Plays chess on Sundays", "categories": []}]}', bad, bad],
    )
    ollama.reset()
    error = await rpc_error(ai_stub.AddMemories(_request((USER_ROLE, "I play chess."))))
    assert error.reason == "EXTRACTION_FAILED"
    assert "unknown memory id '7'" in error.message
    # Asked once more, stricter: fewer items, shorter texts, fewer tokens.
    first, second = (r.body for r in ollama.chat_requests[1:])
    assert first["options"]["num_predict"] > second["options"]["num_predict"]
    assert first["format"]["properties"]["memory"]["items"]["properties"]["id"]["enum"] == [
        "0",
        "new",
    ]
    assert await _texts(ai_stub) == sorted([*before, "Play chess"])


async def test_unknown_and_unreachable_models_change_nothing(
    ai_stub: MemoryStub, ollama: FakeOllama
) -> None:
    error = await rpc_error(
        ai_stub.AddMemories(_request((USER_ROLE, "I like tea."), extraction_model="ollama/nope"))
    )
    assert (error.code, error.reason, error.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_NOT_FOUND",
        {"model": "ollama/nope"},
    )
    ollama.set_model("llama3.2:latest", status_error=(500, "model crashed"))
    error = await rpc_error(ai_stub.AddMemories(_request((USER_ROLE, "I like tea."))))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    ollama.set_model("llama3.2:latest", status_error=None)
    split = await ai_stub.AddMemories(
        _request(
            (USER_ROLE, "I like tea."),
            extraction_provider="ollama",
            extraction_model="llama3.2:latest",
        )
    )
    assert split.extraction_model == "ollama/llama3.2:latest"
    assert await _texts(ai_stub) == ["Like tea"]


async def _wait_for_texts(stub: MemoryStub, expected: list[str]) -> list[str]:
    texts: list[str] = []
    for _ in range(200):
        texts = await _texts(stub)
        if texts == expected:
            break
        await asyncio.sleep(0.05)
    return texts


async def test_background_extraction_is_queued_and_applied(ai_stub: MemoryStub) -> None:
    reply = await ai_stub.AddMemories(_request((USER_ROLE, "I am vegetarian."), background=True))
    assert reply.job_id and list(reply.results) == []
    assert reply.extraction_model == EXTRACTION_MODEL
    assert await _wait_for_texts(ai_stub, ["Is vegetarian"]) == ["Is vegetarian"]
    # Checked before queueing: a bad request is refused at once.
    error = await rpc_error(
        ai_stub.AddMemories(_request((USER_ROLE, "x"), conversation_id="c", background=True))
    )
    assert error.reason == "CONVERSATION_NOT_FOUND"


async def test_queued_turns_survive_a_restart_and_wait_for_providers(
    start_memory: StartMemory, ai_settings: MemorySettings
) -> None:
    down = ai_settings.model_copy(update={"providers_addr": f"127.0.0.1:{_closed_port()}"})
    first = await start_memory(down)
    async with insecure_channel(first.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        job_ids = [
            (await stub.AddMemories(_request((USER_ROLE, text), background=True))).job_id
            for text in ("I am vegetarian.", "I live in Lisbon.")
        ]
        await asyncio.sleep(0.3)  # attempts fail: providers are down
    await first.stop(0.5)

    store = await SqliteStore.open(ai_settings.db_path)
    try:
        jobs = await store.due_jobs(float("inf"), 10)
        assert sorted(j.id for j in jobs) == sorted(job_ids)
        # The earliest was tried and failed; the queue paused rather than fail the next.
        tried = [j for j in jobs if j.attempts >= 1]
        assert tried and all("PROVIDER_UNAVAILABLE" in j.last_error for j in tried)
    finally:
        await store.close()

    second = await start_memory(ai_settings)
    async with insecure_channel(second.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        expected = ["Is vegetarian", "Live in Lisbon"]
        assert await _wait_for_texts(stub, expected) == expected
        for job_id in job_ids:
            for _ in range(100):
                reply = await stub.GetExtractionJob(
                    pb.GetExtractionJobRequest(user_id=USER, job_id=job_id)
                )
                if reply.job.state == pb.EXTRACTION_JOB_STATE_SUCCEEDED:
                    break
                await asyncio.sleep(0.05)
            assert reply.job.state == pb.EXTRACTION_JOB_STATE_SUCCEEDED
    await second.stop(0.5)
    store = await SqliteStore.open(ai_settings.db_path)
    try:
        assert await store.count_jobs() == 0
    finally:
        await store.close()


async def test_extraction_is_held_to_the_allowed_models_of_the_calling_key(
    ai_stub: MemoryStub, ollama: FakeOllama
) -> None:
    """The key's allowed models (from Envoy's key check or the gateway) go on
    to the extraction's model calls: providers refuses a model outside them."""
    turn = _request((USER_ROLE, "I like green tea."))
    error = await rpc_error(
        ai_stub.AddMemories(turn, metadata=(("x-marie-allowed-models", "ollama/gemma3%3A1b"),))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert error.metadata["model"] == EXTRACTION_MODEL
    assert ollama.chat_requests == []
    allowed = await ai_stub.AddMemories(turn, metadata=(("x-marie-allowed-models", "ollama/*"),))
    assert [r.memory.text for r in allowed.results] == ["Like green tea"]


async def test_background_extraction_with_a_model_the_key_may_not_use_is_refused_at_once(
    ai_stub: MemoryStub, ollama: FakeOllama
) -> None:
    """As the synchronous call: PERMISSION_DENIED before anything is queued,
    rather than a job id for a job that can only be dropped later."""
    turn = _request((USER_ROLE, "I like green tea."), background=True)
    for allowed in ("ollama/gemma3%3A1b", "openai/*"):
        error = await rpc_error(
            ai_stub.AddMemories(turn, metadata=(("x-marie-allowed-models", allowed),))
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "MODEL_NOT_ALLOWED",
        )
        assert error.metadata["model"] == EXTRACTION_MODEL
    assert ollama.chat_requests == []
    queued = await ai_stub.AddMemories(turn, metadata=(("x-marie-allowed-models", "ollama/*"),))
    assert queued.job_id
    assert await _wait_for_texts(ai_stub, ["Like green tea"]) == ["Like green tea"]


def test_the_allowed_models_travel_through_the_queue() -> None:
    request = AddRequest(
        user_id="u", messages=(SourceMessage(1, "hi", ""),), allowed_models="ollama/*"
    )
    assert decode_request(encode_request(request)).allowed_models == "ollama/*"
    old = json.loads(encode_request(AddRequest(user_id="u", messages=())))
    del old["allowed_models"]  # a job queued before the field existed
    assert decode_request(json.dumps(old)).allowed_models == ""
