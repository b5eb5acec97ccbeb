"""Stored responses (`store: true`), kept with the memory service's
conversations: one conversation per response, whose id is the response's id
without its `resp_` prefix, holding one record (the response object, its
input items) as JSON in its messages' content, split in pieces a message may
hold. The conversation belongs to the tenant of the key that made it, under
the tenant's reserved end user `marie:responses` (`access/tenancy.py`,
which no REST `user` may name), so responses never show among the tenant's
conversations or search hits, and another tenant's key finds nothing: 404,
as for an id that never existed."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import orjson
from marie.memory.v1 import memory_service_pb2 as mpb
from marie_kit.context import outgoing_metadata

from marie_gateway.core import Gateway
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, from_rpc_error, service_unavailable

log = logging.getLogger("marie.gateway.responses")
T = TypeVar("T")

PREFIX = "resp_"
#: Characters of record per stored message: at most 1 MiB of UTF-8.
PIECE_CHARS = 262_144
#: Pieces read at once; a record longer than this many pieces is not stored.
MAX_PIECES = 100
#: How far back `previous_response_id` is followed.
MAX_CHAIN = 256
_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
UNAVAILABLE_MESSAGE = (
    "Stored responses need the memory service, which is unavailable right now; "
    "retry, or send store: false."
)


def not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(
        404, f"No response found with id '{response_id}'.", code="not_found", param=param
    )


class ResponseStore:
    """Create, save, load and delete stored responses for one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # Saves and deletes still running after their request ended.
        self._pending: set[asyncio.Task[None]] = set()

    def _rpc(self) -> tuple[Any, float, tuple[tuple[str, str], ...]]:
        gw = self.gw
        return gw.backends().memory, gw.settings.control_timeout_seconds, outgoing_metadata()

    def _error(self, exc: grpc.aio.AioRpcError) -> ApiError:
        if exc.code() in _DOWN:
            return service_unavailable(UNAVAILABLE_MESSAGE)
        return from_rpc_error(exc, current_request_id())

    async def _find(self, call: Awaitable[T], response_id: str, param: str | None = None) -> T:
        """`call` on one stored response: 404 when this tenant has no such one."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise not_found(response_id, param) from None
            raise self._error(exc) from None

    async def create(self, user_id: str, model: str) -> str:
        """A new, empty stored response; its id. 503 when memory is down."""
        memory, timeout, metadata = self._rpc()
        try:
            reply = await memory.CreateConversation(
                mpb.CreateConversationRequest(
                    user_id=user_id,
                    title="OpenAI response",
                    model=model[:256],
                    metadata={"object": "response"},
                    # A call retried on another replica creates one.
                    request_id="gw:" + secrets.token_hex(16),
                ),
                timeout=timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return PREFIX + str(reply.conversation.id)

    async def save(self, user_id: str, response_id: str, record: dict[str, Any]) -> None:
        text = orjson.dumps(record).decode()
        pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
        if len(pieces) > MAX_PIECES:
            raise ApiError(
                413, "This response is too large to store; send store: false.", param="store"
            )
        response = record["response"]
        memory, timeout, metadata = self._rpc()
        messages = [
            mpb.Message(
                role=mpb.MESSAGE_ROLE_ASSISTANT,
                content=piece,
                model=response["model"][:256],
                metadata={"object": "response.record", "piece": str(n)},
            )
            for n, piece in enumerate(pieces)
        ]
        usage = response.get("usage") or {}
        messages[0].prompt_tokens = usage.get("input_tokens", 0)
        messages[0].completion_tokens = usage.get("output_tokens", 0)
        try:
            await memory.AppendMessages(
                mpb.AppendMessagesRequest(
                    user_id=user_id,
                    conversation_id=response_id[len(PREFIX) :],
                    messages=messages,
                    # One record per response, even when the call is retried.
                    request_id=response_id,
                ),
                timeout=timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def load(
        self, user_id: str, response_id: str, param: str | None = None
    ) -> dict[str, Any]:
        """The record of a stored response of this tenant; 404 otherwise."""
        if not response_id.startswith(PREFIX) or len(response_id) > 128:
            raise not_found(response_id, param)
        memory, timeout, metadata = self._rpc()
        reply = await self._find(
            memory.ListMessages(
                mpb.ListMessagesRequest(
                    user_id=user_id,
                    conversation_id=response_id[len(PREFIX) :],
                    page_size=MAX_PIECES,
                ),
                timeout=timeout,
                metadata=metadata,
            ),
            response_id,
            param,
        )
        if not reply.messages:
            # Created, but its answer never came (or is still coming).
            raise not_found(response_id, param)
        record: dict[str, Any] = orjson.loads("".join(m.content for m in reply.messages))
        return record

    async def chain(self, user_id: str, previous_id: str) -> list[dict[str, Any]]:
        """The records a continuation follows, oldest first: `previous_id`'s
        and those before it. The one named must exist; an earlier one that was
        deleted ends the chain there."""
        records = [await self.load(user_id, previous_id, "previous_response_id")]
        while len(records) < MAX_CHAIN:
            before = records[-1]["response"].get("previous_response_id")
            if not before:
                break
            try:
                records.append(await self.load(user_id, before))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                break
        records.reverse()
        return records

    async def delete(self, user_id: str, response_id: str) -> None:
        if not response_id.startswith(PREFIX):
            raise not_found(response_id)
        memory, timeout, metadata = self._rpc()
        await self._find(
            memory.DeleteConversation(
                mpb.DeleteConversationRequest(
                    user_id=user_id, conversation_id=response_id[len(PREFIX) :]
                ),
                timeout=timeout,
                metadata=metadata,
            ),
            response_id,
        )

    def later(self, work: Any, what: str) -> None:
        """Run a save or delete after the request (its client has left)."""

        async def run() -> None:
            try:
                await work
            except ApiError as exc:
                log.warning("stored response not %s", what, extra={"error": exc.message})

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
