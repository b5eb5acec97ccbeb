"""Long-term memories over real gRPC, in keyword mode (no embedding model configured)."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as pb
from memory_testkit import MemoryStub

from tests.grpc_testing import rpc_error

USER = "alice"


def _source(content: str, role: int = 2, message_id: str = "") -> pb.SourceMessage:
    return pb.SourceMessage(role=role, content=content, message_id=message_id)  # type: ignore[arg-type]


async def _remember(
    stub: MemoryStub, *texts: str, user: str = USER, **fields: Any
) -> list[pb.AddMemoriesResult]:
    reply = await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=user, messages=[_source(t) for t in texts], infer=False, **fields
        )
    )
    assert reply.extraction_model == ""
    return list(reply.results)


async def test_verbatim_memories_are_added_once_and_never_from_system_messages(
    stub: MemoryStub,
) -> None:
    conv = (await stub.CreateConversation(pb.CreateConversationRequest(user_id=USER))).conversation
    reply = await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=USER,
            infer=False,
            messages=[
                _source("You are a helpful assistant", role=1),
                _source("Likes green tea", message_id="msg_1"),
                _source("Likes green tea"),
                _source("Lives in Lisbon", role=3),
            ],
            categories=["profile"],
            metadata={"app": "web"},
            conversation_id=conv.id,
            actor="app:notes",
        )
    )
    events = [(r.event, r.memory.text) for r in reply.results]
    assert events == [
        (pb.MEMORY_EVENT_ADD, "Likes green tea"),
        (pb.MEMORY_EVENT_NONE, "Likes green tea"),
        (pb.MEMORY_EVENT_ADD, "Lives in Lisbon"),
    ]
    tea = reply.results[0].memory
    assert tea.hash == hashlib.sha256(b"Likes green tea").hexdigest()
    assert list(tea.categories) == ["profile"] and dict(tea.metadata) == {"app": "web"}
    assert tea.source_conversation_id == conv.id and list(tea.source_message_ids) == ["msg_1"]
    assert reply.results[1].memory.id == tea.id

    again = await _remember(stub, "Likes green tea")
    assert [(r.event, r.memory.id) for r in again] == [(pb.MEMORY_EVENT_NONE, tea.id)]
    history = await stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=USER, memory_id=tea.id)
    )
    assert [(e.event, e.new_text, e.actor, e.inferred) for e in history.entries] == [
        (pb.MEMORY_EVENT_ADD, "Likes green tea", "app:notes", False)
    ]


async def test_add_memories_checks_its_request(stub: MemoryStub) -> None:
    cases = [
        (pb.AddMemoriesRequest(user_id=USER, infer=False), "messages"),
        (pb.AddMemoriesRequest(user_id="", infer=False, messages=[_source("x")]), "user_id"),
        (
            pb.AddMemoriesRequest(user_id=USER, infer=False, messages=[_source("")]),
            "messages[0].content",
        ),
        (
            pb.AddMemoriesRequest(user_id=USER, infer=False, messages=[_source("x", role=0)]),
            "messages[0].role",
        ),
        (
            pb.AddMemoriesRequest(user_id=USER, infer=False, messages=[_source("x" * 8193)]),
            "messages[0].content",
        ),
        (
            pb.AddMemoriesRequest(
                user_id=USER, infer=False, messages=[_source("x")], categories=["a", "a"]
            ),
            "categories",
        ),
        (
            pb.AddMemoriesRequest(
                user_id=USER, infer=False, messages=[_source("x")], categories=["c"] * 17
            ),
            "categories",
        ),
        (
            pb.AddMemoriesRequest(
                user_id=USER, infer=False, messages=[_source("x")], actor="a" * 129
            ),
            "actor",
        ),
        (
            pb.AddMemoriesRequest(
                user_id=USER,
                infer=False,
                messages=[_source("x")],
                metadata={str(i): "v" for i in range(33)},
            ),
            "metadata",
        ),
    ]
    for request, field in cases:
        error = await rpc_error(stub.AddMemories(request))
        assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    error = await rpc_error(
        stub.AddMemories(
            pb.AddMemoriesRequest(
                user_id=USER, infer=False, messages=[_source("x")], conversation_id="conv_x"
            )
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    # Inference without any extraction model configured or named.
    error = await rpc_error(
        stub.AddMemories(pb.AddMemoriesRequest(user_id=USER, messages=[_source("x")]))
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXTRACTION_MODEL_NOT_CONFIGURED",
    )
    assert (await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER))).memories == []


async def test_memories_are_updated_deleted_with_history_and_listed_with_filters(
    stub: MemoryStub,
) -> None:
    tea, dog = [r.memory for r in await _remember(stub, "Likes green tea", "Has a dog")]
    updated = (
        await stub.UpdateMemory(
            pb.UpdateMemoryRequest(
                user_id=USER,
                memory=pb.Memory(id=tea.id, text="Likes black tea", categories=["food"]),
                update_mask=FieldMask(paths=["text", "categories"]),
                actor="editor",
            )
        )
    ).memory
    assert updated.text == "Likes black tea" and list(updated.categories) == ["food"]
    assert updated.hash == hashlib.sha256(b"Likes black tea").hexdigest()
    assert updated.create_time == tea.create_time
    meta_only = (
        await stub.UpdateMemory(
            pb.UpdateMemoryRequest(
                user_id=USER,
                memory=pb.Memory(id=tea.id, metadata={"k": "v"}, text="ignored"),
                update_mask=FieldMask(paths=["metadata"]),
            )
        )
    ).memory
    assert meta_only.text == "Likes black tea" and dict(meta_only.metadata) == {"k": "v"}
    for memory, mask, field in [
        (pb.Memory(id=tea.id), [], "update_mask"),
        (pb.Memory(id=tea.id), ["hash"], "update_mask"),
        (pb.Memory(id=tea.id, text=""), ["text"], "memory.text"),
        (pb.Memory(id=""), ["text"], "memory.id"),
        (pb.Memory(id=tea.id, categories=[""]), ["categories"], "memory.categories[0]"),
    ]:
        error = await rpc_error(
            stub.UpdateMemory(
                pb.UpdateMemoryRequest(
                    user_id=USER, memory=memory, update_mask=FieldMask(paths=mask)
                )
            )
        )
        assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)

    filtered = await stub.ListMemories(
        pb.ListMemoriesRequest(user_id=USER, filter=pb.MemoryFilter(categories=["food"]))
    )
    assert [m.id for m in filtered.memories] == [tea.id]
    listed = await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER, page_size=1))
    assert [m.id for m in listed.memories] == [dog.id]
    rest = await stub.ListMemories(
        pb.ListMemoriesRequest(user_id=USER, page_size=1, page_token=listed.next_page_token)
    )
    assert [m.id for m in rest.memories] == [tea.id] and rest.next_page_token == ""

    await stub.DeleteMemory(pb.DeleteMemoryRequest(user_id=USER, memory_id=tea.id))
    history = await stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=USER, memory_id=tea.id, page_size=2)
    )
    more = await stub.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(
            user_id=USER, memory_id=tea.id, page_size=2, page_token=history.next_page_token
        )
    )
    entries = [*history.entries, *more.entries]
    assert [(e.event, e.old_text, e.new_text) for e in entries] == [
        (pb.MEMORY_EVENT_ADD, "", "Likes green tea"),
        (pb.MEMORY_EVENT_UPDATE, "Likes green tea", "Likes black tea"),
        (pb.MEMORY_EVENT_UPDATE, "Likes black tea", "Likes black tea"),
        (pb.MEMORY_EVENT_DELETE, "Likes black tea", ""),
    ]
    assert entries[1].actor == "editor" and entries[2].actor == USER
    for call in (
        stub.GetMemory(pb.GetMemoryRequest(user_id=USER, memory_id=tea.id)),
        stub.DeleteMemory(pb.DeleteMemoryRequest(user_id=USER, memory_id=tea.id)),
        stub.UpdateMemory(
            pb.UpdateMemoryRequest(
                user_id=USER,
                memory=pb.Memory(id=tea.id, text="x"),
                update_mask=FieldMask(paths=["text"]),
            )
        ),
    ):
        error = await rpc_error(call)
        assert (error.code, error.reason, error.metadata) == (
            grpc.StatusCode.NOT_FOUND,
            "MEMORY_NOT_FOUND",
            {"memory_id": tea.id},
        )

    await stub.DeleteMemory(
        pb.DeleteMemoryRequest(user_id=USER, memory_id=dog.id, erase_history=True)
    )
    error = await rpc_error(
        stub.GetMemoryHistory(pb.GetMemoryHistoryRequest(user_id=USER, memory_id=dog.id))
    )
    assert error.reason == "MEMORY_NOT_FOUND"


async def test_keyword_search_ranks_filters_thresholds_and_says_why(stub: MemoryStub) -> None:
    await _remember(stub, "Allergic to peanuts", "Likes peanuts and peanut butter, peanuts!")
    await _remember(stub, "Plays chess on peanuts day", categories=["games"])
    reply = await stub.SearchMemories(pb.SearchMemoriesRequest(user_id=USER, query="peanuts"))
    assert reply.mode_used == pb.SEARCH_MODE_KEYWORD
    assert reply.mode_note == "no embedding model configured"
    assert len(reply.results) == 3
    assert reply.results[0].memory.text.startswith("Likes peanuts")
    assert reply.results[0].score == pytest.approx(1.0)
    assert [r.score for r in reply.results] == sorted(
        (r.score for r in reply.results), reverse=True
    )
    top = await stub.SearchMemories(
        pb.SearchMemoriesRequest(user_id=USER, query="peanuts", top_k=1)
    )
    assert len(top.results) == 1
    games = await stub.SearchMemories(
        pb.SearchMemoriesRequest(
            user_id=USER,
            query="peanuts",
            filter=pb.MemoryFilter(categories=["games"]),
            mode=pb.SEARCH_MODE_KEYWORD,
        )
    )
    assert [r.memory.text for r in games.results] == ["Plays chess on peanuts day"]
    assert games.mode_note == ""
    threshold = reply.results[1].score + 1e-4
    above = await stub.SearchMemories(
        pb.SearchMemoriesRequest(user_id=USER, query="peanuts", score_threshold=threshold)
    )
    assert len(above.results) == 1
    error = await rpc_error(
        stub.SearchMemories(
            pb.SearchMemoriesRequest(user_id=USER, query="x", mode=pb.SEARCH_MODE_VECTOR)
        )
    )
    assert error.reason == "EMBEDDINGS_NOT_CONFIGURED"
    for request, field in [
        (pb.SearchMemoriesRequest(user_id=USER, query=""), "query"),
        (pb.SearchMemoriesRequest(user_id=USER, query="x", top_k=-1), "top_k"),
        (pb.SearchMemoriesRequest(user_id=USER, query="x", score_threshold=1.5), "score_threshold"),
    ]:
        error = await rpc_error(stub.SearchMemories(request))
        assert error.metadata["field"] == field


async def test_delete_all_memories_leaves_nothing_of_the_user_and_keeps_conversations(
    stub: MemoryStub,
) -> None:
    conv = (await stub.CreateConversation(pb.CreateConversationRequest(user_id=USER))).conversation
    mine = [r.memory for r in await _remember(stub, "Likes tea", "Has a cat")]
    await _remember(stub, "Likes tea", user="bob")
    reply = await stub.DeleteAllMemories(pb.DeleteAllMemoriesRequest(user_id=USER))
    assert reply.deleted_count == 2
    assert (
        await stub.DeleteAllMemories(pb.DeleteAllMemoriesRequest(user_id=USER))
    ).deleted_count == 0
    assert (await stub.ListMemories(pb.ListMemoriesRequest(user_id=USER))).memories == []
    assert (
        await stub.SearchMemories(pb.SearchMemoriesRequest(user_id=USER, query="tea cat"))
    ).results == []
    for memory in mine:
        for call in (
            stub.GetMemory(pb.GetMemoryRequest(user_id=USER, memory_id=memory.id)),
            stub.GetMemoryHistory(pb.GetMemoryHistoryRequest(user_id=USER, memory_id=memory.id)),
        ):
            assert (await rpc_error(call)).reason == "MEMORY_NOT_FOUND"
    bob = await stub.SearchMemories(pb.SearchMemoriesRequest(user_id="bob", query="tea"))
    assert len(bob.results) == 1
    await stub.GetConversation(pb.GetConversationRequest(user_id=USER, conversation_id=conv.id))
