"""Streaming chat: an async iterator of chunks that cancels the call on exit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb

from marie_client.errors import MarieError

ROLES = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
    "developer": pb.ROLE_DEVELOPER,
}

MessageLike = pb.ChatMessage | Mapping[str, Any]


def to_message(message: MessageLike) -> pb.ChatMessage:
    """A ChatMessage from itself or an OpenAI-style ``{"role", "content"}`` dict."""
    if isinstance(message, pb.ChatMessage):
        return message
    fields = dict(message)
    role = fields.pop("role", "")
    if isinstance(role, str):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        role = ROLES[role]
    return pb.ChatMessage(role=role, **fields)


def to_messages(messages: Iterable[MessageLike]) -> list[pb.ChatMessage]:
    return [to_message(m) for m in messages]


@dataclass
class ChatResult:
    """A whole reply assembled from its chunks."""

    id: str = ""
    model: str = ""
    provider: str = ""
    content: str = ""
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    usage: pb.Usage | None = None
    tool_calls: dict[int, pb.ToolCallDelta] = field(default_factory=dict)


class ChatStream:
    """One StreamChatCompletion call.

    Iterate it (``async for chunk in stream``) for the chunks, or ``await
    stream.collect()`` for the whole reply. Leaving ``async with`` early,
    :meth:`cancel`, or cancelling the task that iterates it cancels the call
    on the server, which stops the model upstream.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, pb.StreamChatCompletionResponse]):
        self._call = call

    def __aiter__(self) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        try:
            async for chunk in self._call:
                yield chunk
        except grpc.aio.AioRpcError as error:
            raise MarieError.from_rpc_error(error) from None

    async def collect(self) -> ChatResult:
        """Read the stream to its end and assemble the reply."""
        result = ChatResult()
        parts: list[str] = []
        async for chunk in self:
            result.id = result.id or chunk.id
            result.model = result.model or chunk.model
            result.provider = result.provider or chunk.provider
            parts.append(chunk.content)
            for delta in chunk.tool_calls:
                known = result.tool_calls.setdefault(delta.index, pb.ToolCallDelta())
                known.index = delta.index
                known.id = known.id or delta.id
                known.type = known.type or delta.type
                known.name = known.name or delta.name
                known.arguments += delta.arguments
            if chunk.finish_reason:
                result.finish_reason = chunk.finish_reason
            if chunk.HasField("usage"):
                result.usage = chunk.usage
        result.content = "".join(parts)
        return result

    def cancel(self) -> bool:
        """Cancel the call (the server sees it at once); False if it had ended."""
        return self._call.cancel()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
