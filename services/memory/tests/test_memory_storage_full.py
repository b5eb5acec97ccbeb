"""The memory service when its store has no room left, over real gRPC on a
real SQLite file capped by MARIE_MEMORY_DB_MAX_BYTES (SQLite's own
SQLITE_FULL, the error a full disk gives): writes are STORAGE_FULL and
change nothing, reads go on, health is NOT_SERVING until a write succeeds."""

from __future__ import annotations

import asyncio

import grpc
from marie.memory.v1 import memory_service_pb2 as pb
from marie.memory.v1 import memory_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.errors import ServiceError
from marie_memory.settings import MemorySettings
from memory_testkit import MemoryStub, StartMemory

from tests.grpc_testing import rpc_error

USER = "alice"
SERVICE = "marie.memory.v1.MemoryService"
MESSAGE = "tea " * 25_000  # 100 kB


async def _fill(stub: MemoryStub) -> tuple[str, ServiceError]:
    """A conversation and messages appended to it until an append is refused."""
    made = await stub.CreateConversation(pb.CreateConversationRequest(user_id=USER, title="t"))
    conversation = made.conversation.id
    for _ in range(100):
        try:
            await stub.AppendMessages(
                pb.AppendMessagesRequest(
                    user_id=USER,
                    conversation_id=conversation,
                    messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content=MESSAGE)],
                )
            )
        except grpc.aio.AioRpcError as exc:
            return conversation, ServiceError.from_rpc_error(exc)
    raise AssertionError("the capped store never filled up")


async def _wait_serving(channel: grpc.aio.Channel, serving: bool) -> None:
    for _ in range(300):  # the store is probed every 2 s
        if await is_serving(channel, SERVICE) == serving:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {'SERVING' if serving else 'NOT_SERVING'}")


async def test_a_full_store_refuses_writes_and_is_not_ready_until_it_can_write(
    start_memory: StartMemory, settings: MemorySettings
) -> None:
    capped = settings.model_copy(update={"db_max_bytes": 2 * 1024 * 1024})
    server = await start_memory(capped)
    async with insecure_channel(server.target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        conversation, error = await _fill(stub)

        assert (error.code, error.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "STORAGE_FULL",
        )
        assert error.domain == "marie.memory"
        await _wait_serving(channel, False)
        # Reads go on; the refused append left nothing behind.
        listed = await stub.ListMessages(
            pb.ListMessagesRequest(user_id=USER, conversation_id=conversation, page_size=100)
        )
        assert listed.messages and all(m.content == MESSAGE for m in listed.messages)
        positions = [m.position for m in listed.messages]
        assert positions == list(range(len(positions)))
        refused = await rpc_error(
            stub.AppendMessages(
                pb.AppendMessagesRequest(
                    user_id=USER,
                    conversation_id=conversation,
                    messages=[pb.Message(role=pb.MESSAGE_ROLE_USER, content=MESSAGE)],
                )
            )
        )
        assert refused.reason == "STORAGE_FULL"

        # Deleting frees room: the service says so by itself.
        await stub.DeleteConversation(
            pb.DeleteConversationRequest(user_id=USER, conversation_id=conversation)
        )
        await _wait_serving(channel, True)
        again = await stub.CreateConversation(pb.CreateConversationRequest(user_id=USER))
        assert again.conversation.id
