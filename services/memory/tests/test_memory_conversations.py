"""Conversations and messages over real gRPC: semantics, paging, limits, error reasons."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as pb
from marie_kit.tenancy import MAX_USER_ID
from memory_testkit import MemoryStub

from tests.grpc_testing import rpc_error

USER = "alice"


async def _conversation(stub: MemoryStub, user: str = USER, **fields: Any) -> pb.Conversation:
    reply = await stub.CreateConversation(pb.CreateConversationRequest(user_id=user, **fields))
    return reply.conversation


def _msg(role: int, content: str, **fields: object) -> pb.Message:
    return pb.Message(role=role, content=content, **fields)  # type: ignore[arg-type]


async def test_a_conversation_is_created_read_updated_and_deleted(stub: MemoryStub) -> None:
    created = await _conversation(
        stub, title="Trip", provider="ollama", model="llama3.2:latest", metadata={"app": "web"}
    )
    assert created.id and created.user_id == USER and created.message_count == 0
    assert created.create_time.seconds > 0 and created.update_time == created.create_time

    got = await stub.GetConversation(
        pb.GetConversationRequest(user_id=USER, conversation_id=created.id)
    )
    assert got.conversation == created

    changed = await stub.UpdateConversation(
        pb.UpdateConversationRequest(
            user_id=USER,
            conversation=pb.Conversation(id=created.id, model="gemma3:1b", title="ignored"),
            update_mask=FieldMask(paths=["model", "provider"]),
        )
    )
    c = changed.conversation
    assert (c.title, c.provider, c.model) == ("Trip", "", "gemma3:1b")
    assert c.update_time.ToNanoseconds() >= created.update_time.ToNanoseconds()

    for mask in ([], ["id"], ["message_count"], ["user_id"]):
        error = await rpc_error(
            stub.UpdateConversation(
                pb.UpdateConversationRequest(
                    user_id=USER,
                    conversation=pb.Conversation(id=created.id),
                    update_mask=FieldMask(paths=mask),
                )
            )
        )
        assert (error.code, error.metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "update_mask",
        )

    await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER, conversation_id=created.id, messages=[_msg(2, "a"), _msg(3, "b")]
        )
    )
    deleted = await stub.DeleteConversation(
        pb.DeleteConversationRequest(user_id=USER, conversation_id=created.id)
    )
    assert deleted.deleted_message_count == 2
    for call in (
        stub.GetConversation(pb.GetConversationRequest(user_id=USER, conversation_id=created.id)),
        stub.DeleteConversation(
            pb.DeleteConversationRequest(user_id=USER, conversation_id=created.id)
        ),
    ):
        error = await rpc_error(call)
        assert (error.code, error.reason, error.domain) == (
            grpc.StatusCode.NOT_FOUND,
            "CONVERSATION_NOT_FOUND",
            "marie.memory",
        )
        assert error.metadata == {"conversation_id": created.id}


async def test_conversations_page_newest_first_with_tokens_bound_to_the_request(
    stub: MemoryStub,
) -> None:
    ids = [(await _conversation(stub, title=f"c{i}")).id for i in range(5)]
    first = await stub.ListConversations(pb.ListConversationsRequest(user_id=USER, page_size=2))
    assert [c.id for c in first.conversations] == ids[::-1][:2]
    second = await stub.ListConversations(
        pb.ListConversationsRequest(user_id=USER, page_size=2, page_token=first.next_page_token)
    )
    third = await stub.ListConversations(
        pb.ListConversationsRequest(user_id=USER, page_size=2, page_token=second.next_page_token)
    )
    assert [c.id for c in [*second.conversations, *third.conversations]] == ids[::-1][2:]
    assert third.next_page_token == ""

    # Activity moves a conversation first in "update_time desc".
    await stub.AppendMessages(
        pb.AppendMessagesRequest(user_id=USER, conversation_id=ids[0], messages=[_msg(2, "hi")])
    )
    active = await stub.ListConversations(
        pb.ListConversationsRequest(user_id=USER, order_by="update_time desc", page_size=1)
    )
    assert active.conversations[0].id == ids[0]

    for request, field in [
        (pb.ListConversationsRequest(user_id=USER, page_size=-1), "page_size"),
        (pb.ListConversationsRequest(user_id=USER, order_by="title"), "order_by"),
        (pb.ListConversationsRequest(user_id=USER, page_token="!!"), "page_token"),
        (
            pb.ListConversationsRequest(
                user_id=USER, page_token=first.next_page_token, order_by="update_time desc"
            ),
            "page_token",
        ),
        (
            pb.ListConversationsRequest(user_id="bob", page_token=first.next_page_token),
            "page_token",
        ),
        (pb.ListConversationsRequest(user_id=""), "user_id"),
        (pb.ListConversationsRequest(user_id="x" * (MAX_USER_ID + 1)), "user_id"),
    ]:
        error = await rpc_error(stub.ListConversations(request))
        assert (error.code, error.reason, error.metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            field,
        )


async def test_messages_append_atomically_and_list_both_ways(stub: MemoryStub) -> None:
    conv = await _conversation(stub)
    call = pb.ToolCall(id="call_1", function_name="weather", arguments='{"city":"Paris"}')
    reply = await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER,
            conversation_id=conv.id,
            messages=[
                _msg(1, "be brief"),
                _msg(2, "weather?", name="al"),
                _msg(
                    3,
                    "",
                    tool_calls=[call],
                    provider="ollama",
                    model="llama3.2",
                    prompt_tokens=12,
                    completion_tokens=3,
                    metadata={"finish": "tool_calls"},
                ),
                _msg(4, '{"t": 20}', tool_call_id="call_1"),
            ],
        )
    )
    assert [m.position for m in reply.messages] == [0, 1, 2, 3]
    assert reply.conversation.message_count == 4
    assert reply.messages[2].tool_calls[0] == call and reply.messages[2].prompt_tokens == 12

    # One bad message: nothing is stored.
    error = await rpc_error(
        stub.AppendMessages(
            pb.AppendMessagesRequest(
                user_id=USER, conversation_id=conv.id, messages=[_msg(2, "ok"), _msg(0, "x")]
            )
        )
    )
    assert error.metadata["field"] == "messages[1].role"
    for bad, field in [
        ([_msg(2, "")], "messages[0].content"),
        ([_msg(2, "x", metadata={"k" * 65: "v"})], f"messages[0].metadata[{'k' * 65!r}]"),
        ([_msg(2, "x" * 1_048_577)], "messages[0].content"),
        ([], "messages"),
        ([_msg(2, "x")] * 101, "messages"),
    ]:
        error = await rpc_error(
            stub.AppendMessages(
                pb.AppendMessagesRequest(user_id=USER, conversation_id=conv.id, messages=bad)
            )
        )
        assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)

    page = await stub.ListMessages(
        pb.ListMessagesRequest(user_id=USER, conversation_id=conv.id, page_size=3)
    )
    assert [m.position for m in page.messages] == [0, 1, 2] and page.next_page_token
    rest = await stub.ListMessages(
        pb.ListMessagesRequest(
            user_id=USER, conversation_id=conv.id, page_size=3, page_token=page.next_page_token
        )
    )
    assert [m.position for m in rest.messages] == [3] and rest.next_page_token == ""
    newest = await stub.ListMessages(
        pb.ListMessagesRequest(
            user_id=USER, conversation_id=conv.id, page_size=2, order_by="position desc"
        )
    )
    assert [m.content for m in newest.messages] == ['{"t": 20}', ""]
    error = await rpc_error(
        stub.ListMessages(
            pb.ListMessagesRequest(user_id=USER, conversation_id=conv.id, order_by="id")
        )
    )
    assert error.metadata["field"] == "order_by"


async def test_message_search_highlights_pages_and_says_it_ranks_by_keywords(
    stub: MemoryStub,
) -> None:
    conv = await _conversation(stub, title="Holidays")
    await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=USER,
            conversation_id=conv.id,
            messages=[_msg(2, f"Lisbon plan number {i} <b>") for i in range(5)]
            + [_msg(3, "Porto is nice")],
        )
    )
    first = await stub.SearchMessages(
        pb.SearchMessagesRequest(user_id=USER, query="lisbon", page_size=3)
    )
    assert first.mode_used == pb.SEARCH_MODE_KEYWORD
    assert first.mode_note == "no embedding model configured"
    assert len(first.hits) == 3 and first.next_page_token
    hit = first.hits[0]
    assert hit.conversation_id == conv.id and hit.conversation_title == "Holidays"
    assert hit.score == pytest.approx(1.0)
    assert hit.snippets[0].startswith("<mark>Lisbon</mark> plan number")
    assert hit.snippets[0].endswith("&lt;b&gt;")
    second = await stub.SearchMessages(
        pb.SearchMessagesRequest(
            user_id=USER, query="lisbon", page_size=3, page_token=first.next_page_token
        )
    )
    assert len(second.hits) == 2 and second.next_page_token == ""
    seen = {h.message.id for h in first.hits} | {h.message.id for h in second.hits}
    assert len(seen) == 5

    keyword = await stub.SearchMessages(
        pb.SearchMessagesRequest(
            user_id=USER,
            query="porto",
            mode=pb.SEARCH_MODE_KEYWORD,
            roles=[pb.MESSAGE_ROLE_ASSISTANT],
        )
    )
    assert [h.message.content for h in keyword.hits] == ["Porto is nice"]
    assert keyword.mode_note == ""
    error = await rpc_error(
        stub.SearchMessages(
            pb.SearchMessagesRequest(user_id=USER, query="x", mode=pb.SEARCH_MODE_VECTOR)
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "EMBEDDINGS_NOT_CONFIGURED",
    )
    error = await rpc_error(
        stub.SearchMessages(
            pb.SearchMessagesRequest(user_id=USER, query="x", conversation_id="conv_nope")
        )
    )
    assert error.reason == "CONVERSATION_NOT_FOUND"
    for request, field in [
        (pb.SearchMessagesRequest(user_id=USER, query=""), "query"),
        (pb.SearchMessagesRequest(user_id=USER, query="x" * 4097), "query"),
        (pb.SearchMessagesRequest(user_id=USER, query="x", roles=[9]), "roles[0]"),  # type: ignore[list-item]
        (
            pb.SearchMessagesRequest(user_id=USER, query="porto", page_token=first.next_page_token),
            "page_token",
        ),
    ]:
        error = await rpc_error(stub.SearchMessages(request))
        assert error.metadata["field"] == field


async def test_very_long_ids_are_not_found_not_a_metadata_overflow(stub: MemoryStub) -> None:
    # Echoed whole in the error, a 5,000-character id overflowed the client's
    # metadata limit: RESOURCE_EXHAUSTED, which HTTP clients read as a rate limit.
    long_id = "c" * 5000
    conversation = await rpc_error(
        stub.GetConversation(pb.GetConversationRequest(user_id=USER, conversation_id=long_id))
    )
    memory = await rpc_error(stub.GetMemory(pb.GetMemoryRequest(user_id=USER, memory_id=long_id)))

    assert (conversation.code, conversation.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    assert (memory.code, memory.reason) == (grpc.StatusCode.NOT_FOUND, "MEMORY_NOT_FOUND")
