"""Strict per-user isolation, RPC by RPC: another user's resource is answered exactly
like one that does not exist, and nothing of one user shows in another's lists or searches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_kit.tenancy import belongs_to, tenant_user_id, user_ids
from memory_testkit import MemoryStub

from tests.grpc_testing import rpc_error

OWNER, OTHER = "tenant-a:alice", "tenant-a:alice2"
UNKNOWN = "zz_unknown_id"

Call = Callable[[MemoryStub, str, str], Awaitable[Any]]

CONVERSATION_CALLS: dict[str, Call] = {
    "GetConversation": lambda s, u, i: s.GetConversation(
        pb.GetConversationRequest(user_id=u, conversation_id=i)
    ),
    "UpdateConversation": lambda s, u, i: s.UpdateConversation(
        pb.UpdateConversationRequest(
            user_id=u,
            conversation=pb.Conversation(id=i, title="x"),
            update_mask=FieldMask(paths=["title"]),
        )
    ),
    "DeleteConversation": lambda s, u, i: s.DeleteConversation(
        pb.DeleteConversationRequest(user_id=u, conversation_id=i)
    ),
    "AppendMessages": lambda s, u, i: s.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=u,
            conversation_id=i,
            messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content="x")],
        )
    ),
    "ListMessages": lambda s, u, i: s.ListMessages(
        pb.ListMessagesRequest(user_id=u, conversation_id=i)
    ),
    "SearchMessages": lambda s, u, i: s.SearchMessages(
        pb.SearchMessagesRequest(user_id=u, query="secret", conversation_id=i)
    ),
    "AddMemories": lambda s, u, i: s.AddMemories(
        pb.AddMemoriesRequest(
            user_id=u,
            infer=False,
            conversation_id=i,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content="x")],
        )
    ),
}
MEMORY_CALLS: dict[str, Call] = {
    "GetMemory": lambda s, u, i: s.GetMemory(pb.GetMemoryRequest(user_id=u, memory_id=i)),
    "UpdateMemory": lambda s, u, i: s.UpdateMemory(
        pb.UpdateMemoryRequest(
            user_id=u, memory=pb.Memory(id=i, text="x"), update_mask=FieldMask(paths=["text"])
        )
    ),
    "DeleteMemory": lambda s, u, i: s.DeleteMemory(pb.DeleteMemoryRequest(user_id=u, memory_id=i)),
    "GetMemoryHistory": lambda s, u, i: s.GetMemoryHistory(
        pb.GetMemoryHistoryRequest(user_id=u, memory_id=i)
    ),
}


def _same_as_missing(theirs: ServiceError, missing: ServiceError, real_id: str) -> None:
    assert theirs.code == missing.code
    assert theirs.reason == missing.reason
    assert theirs.message == missing.message.replace(UNKNOWN, real_id)
    assert theirs.metadata == {k: v.replace(UNKNOWN, real_id) for k, v in missing.metadata.items()}


async def _owner_data(stub: MemoryStub) -> tuple[str, str]:
    conv = (
        await stub.CreateConversation(pb.CreateConversationRequest(user_id=OWNER, title="secret"))
    ).conversation
    await stub.AppendMessages(
        pb.AppendMessagesRequest(
            user_id=OWNER,
            conversation_id=conv.id,
            messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content="my secret")],
        )
    )
    added = await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=OWNER,
            infer=False,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content="secret fact")],
        )
    )
    return conv.id, added.results[0].memory.id


@pytest.mark.parametrize("rpc", sorted(CONVERSATION_CALLS))
async def test_another_users_conversation_does_not_exist(stub: MemoryStub, rpc: str) -> None:
    conversation_id, _ = await _owner_data(stub)
    call = CONVERSATION_CALLS[rpc]
    theirs = await rpc_error(call(stub, OTHER, conversation_id))
    missing = await rpc_error(call(stub, OTHER, UNKNOWN))
    _same_as_missing(theirs, missing, conversation_id)
    assert theirs.reason == "CONVERSATION_NOT_FOUND"
    # And the owner's conversation is untouched.
    owned = await stub.GetConversation(
        pb.GetConversationRequest(user_id=OWNER, conversation_id=conversation_id)
    )
    assert owned.conversation.title == "secret" and owned.conversation.message_count == 1


@pytest.mark.parametrize("rpc", sorted(MEMORY_CALLS))
async def test_another_users_memory_does_not_exist(stub: MemoryStub, rpc: str) -> None:
    _, memory_id = await _owner_data(stub)
    call = MEMORY_CALLS[rpc]
    theirs = await rpc_error(call(stub, OTHER, memory_id))
    missing = await rpc_error(call(stub, OTHER, UNKNOWN))
    _same_as_missing(theirs, missing, memory_id)
    assert theirs.reason == "MEMORY_NOT_FOUND"
    owned = await stub.GetMemory(pb.GetMemoryRequest(user_id=OWNER, memory_id=memory_id))
    assert owned.memory.text == "secret fact"


async def test_lists_searches_and_erasure_never_cross_users(stub: MemoryStub) -> None:
    await _owner_data(stub)
    assert (
        await stub.ListConversations(pb.ListConversationsRequest(user_id=OTHER))
    ).conversations == []
    assert (
        await stub.SearchMessages(pb.SearchMessagesRequest(user_id=OTHER, query="secret"))
    ).hits == []
    assert (await stub.ListMemories(pb.ListMemoriesRequest(user_id=OTHER))).memories == []
    assert (
        await stub.SearchMemories(pb.SearchMemoriesRequest(user_id=OTHER, query="secret"))
    ).results == []
    # Same text for the other user is a new memory, not a duplicate of the owner's.
    added = await stub.AddMemories(
        pb.AddMemoriesRequest(
            user_id=OTHER,
            infer=False,
            messages=[pb.SourceMessage(role=pb.MESSAGE_ROLE_USER, content="secret fact")],
        )
    )
    assert added.results[0].event == pb.MEMORY_EVENT_ADD
    assert (
        await stub.DeleteAllMemories(pb.DeleteAllMemoriesRequest(user_id=OTHER))
    ).deleted_count == 1
    assert len((await stub.ListMemories(pb.ListMemoriesRequest(user_id=OWNER))).memories) == 1
    # user ids are compared exactly: case matters.
    assert (await stub.ListMemories(pb.ListMemoriesRequest(user_id=OWNER.upper()))).memories == []


# ---------------------------------------------------- tenant bound by the key check

TENANT = "team-a"
MINE, THEIRS = tenant_user_id(TENANT, "alice"), tenant_user_id("team-ab", "alice")
# The tenant header as Envoy adds it from the gateway's key check (percent-encoded).
AS_TEAM_A = (("x-marie-tenant", "team-a"),)


async def test_a_call_with_a_verified_tenant_reaches_only_that_tenants_users(
    stub: MemoryStub,
) -> None:
    created = await stub.CreateConversation(
        pb.CreateConversationRequest(user_id=MINE, title="ok"), metadata=AS_TEAM_A
    )
    assert created.conversation.user_id == MINE
    # Another tenant's user (a name that merely starts alike too), a bare name,
    # an empty one: refused before the service looks.
    for user_id in (THEIRS, "alice", "6:team-a", tenant_user_id("team-", "a/alice"), ""):
        refused = await rpc_error(
            stub.ListMemories(pb.ListMemoriesRequest(user_id=user_id), metadata=AS_TEAM_A)
        )
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "TENANT_MISMATCH",
        ), user_id
        assert refused.metadata == {"field": "user_id"}
    # Nothing was written for the refused call.
    await stub.CreateConversation(
        pb.CreateConversationRequest(user_id=MINE, title="x"), metadata=AS_TEAM_A
    )
    refused = await rpc_error(
        stub.CreateConversation(
            pb.CreateConversationRequest(user_id=THEIRS, title="x"), metadata=AS_TEAM_A
        )
    )
    assert refused.reason == "TENANT_MISMATCH"
    assert (
        await stub.ListConversations(pb.ListConversationsRequest(user_id=THEIRS))
    ).conversations == []
    # A tenant with characters that are percent-encoded in the header.
    odd = "équipe b/c"
    reply = await stub.ListMemories(
        pb.ListMemoriesRequest(user_id=tenant_user_id(odd, "bob")),
        metadata=(("x-marie-tenant", quote(odd, safe="")),),
    )
    assert list(reply.memories) == []
    # Without the header (the gateway, inside the deployment) any user id is served.
    listed = await stub.ListConversations(pb.ListConversationsRequest(user_id=MINE))
    assert len(listed.conversations) == 2


def test_every_user_id_of_a_request_is_checked_nested_ones_included() -> None:
    request = pb.UpdateConversationRequest(
        user_id=MINE, conversation=pb.Conversation(id="c", user_id=THEIRS)
    )
    assert list(user_ids(request)) == [MINE, THEIRS]
    # An unset nested user_id (output only) names nobody; an unset top-level one does.
    assert list(user_ids(pb.UpdateConversationRequest(conversation=pb.Conversation(id="c")))) == [
        ""
    ]
    assert belongs_to(MINE, TENANT) and not belongs_to(THEIRS, TENANT)
