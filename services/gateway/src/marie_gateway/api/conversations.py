"""Conversations: `/api/conversations` (create, list, read, update, delete),
their messages, a turn with the conversation's model, and `/api/search` over
messages, all over the memory service.

A conversation turn (`POST /api/conversations/{id}/messages`) streams the
answer of the conversation's model in OpenAI's chunk format, then stores the
user's message and the answer (tokens, latency), and queues the exchange for
memory extraction in the memory service's durable queue. A client that leaves
mid-answer leaves the partial answer stored, marked `"partial": "true"`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as mpb
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit.context import outgoing_metadata
from marie_kit.errors import ServiceError
from marie_kit.identity import identity_metadata
from pydantic import ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT, SCOPE_MEMORY
from marie_gateway.access.tally import Tally
from marie_gateway.api.memory_client import (
    MODE_NAMES,
    ROLES,
    MemoryCalls,
    Metadata,
    _UserBody,
    api_error,
    body_user_id,
    conversation_json,
    idempotency_key,
    int_param,
    message_json,
    mode_param,
    page_json,
    some_of,
)
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, bad_request, from_rpc_error
from marie_gateway.http.params import (
    MAX_ID_LENGTH,
    MAX_PAGE_TOKEN_LENGTH,
    path_text,
    text_query,
)
from marie_gateway.http.sse import DONE, EventStreamResponse, event
from marie_gateway.openai.enrichment import memories_message
from marie_gateway.openai.mapping import FINISH_REASONS, chunk_delta, chunk_payload, usage_payload
from marie_gateway.openai.schemas import PositiveInt32

log = logging.getLogger("marie.gateway.memory")

# Messages of a conversation sent to the model with a new turn (the newest).
HISTORY_MESSAGES = 100
#: The largest message the memory service stores (1 MiB of UTF-8): a turn
#: larger than that is refused before the model is asked, not after.
MAX_TURN_BYTES = 1_048_576
TO_PROVIDER_ROLE = {
    mpb.MESSAGE_ROLE_SYSTEM: ppb.ROLE_SYSTEM,
    mpb.MESSAGE_ROLE_USER: ppb.ROLE_USER,
    mpb.MESSAGE_ROLE_ASSISTANT: ppb.ROLE_ASSISTANT,
    mpb.MESSAGE_ROLE_TOOL: ppb.ROLE_TOOL,
}


class ConversationCreate(_UserBody):
    title: str = Field(default="", max_length=256)
    model: str = Field(default="", max_length=256)
    provider: str = Field(default="", max_length=256)
    metadata: Metadata = Field(default_factory=dict)


class ConversationPatch(_UserBody):
    # At least one thing to change (a null is no change).
    model_config = ConfigDict(json_schema_extra=some_of("title", "model", "provider", "metadata"))

    title: str | None = Field(default=None, max_length=256)
    model: str | None = Field(default=None, max_length=256)
    provider: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None


class TurnCreate(_UserBody):
    content: str = Field(
        min_length=1, max_length=MAX_TURN_BYTES, description="At most 1 MiB in UTF-8."
    )
    stream: bool = True
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: PositiveInt32 | None = None


class ConversationRoutes(MemoryCalls):
    """Handlers of `/api/conversations…` and `/api/search`."""

    def __init__(self, gw: Gateway) -> None:
        super().__init__(gw)
        # Stores of partial answers still running after their client left.
        self._pending: set[asyncio.Task[None]] = set()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/conversations", self.create_conversation, methods=["POST"]),
            Route("/api/conversations", self.list_conversations, methods=["GET"]),
            Route("/api/conversations/{id}", self.get_conversation, methods=["GET"]),
            Route("/api/conversations/{id}", self.update_conversation, methods=["PATCH"]),
            Route("/api/conversations/{id}", self.delete_conversation, methods=["DELETE"]),
            Route("/api/conversations/{id}/messages", self.list_messages, methods=["GET"]),
            Route("/api/conversations/{id}/messages", self.post_turn, methods=["POST"]),
            Route("/api/search", self.search_messages, methods=["GET"]),
        ]

    async def create_conversation(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(ConversationCreate, await self.gw.read_body(request))
        user_id = body_user_id(request, principal, body)
        key = idempotency_key(request)
        reply = await self._call(
            self._memory().CreateConversation(
                mpb.CreateConversationRequest(
                    user_id=user_id,
                    title=body.title,
                    provider=body.provider,
                    model=body.model,
                    metadata=body.metadata,
                    request_id=key,
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(conversation_json(reply.conversation), status_code=201)

    async def list_conversations(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        order = request.query_params.get("order", "")
        order_by = {"": "", "created": "create_time desc", "updated": "update_time desc"}.get(order)
        if order_by is None:
            raise bad_request("'order' is 'created' or 'updated'.", "order")
        reply = await self._call(
            self._memory().ListConversations(
                mpb.ListConversationsRequest(
                    user_id=user_id,
                    page_size=int_param(request, "limit"),
                    page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
                    order_by=order_by,
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([conversation_json(c) for c in reply.conversations], reply.next_page_token)
        )

    async def _get_conversation(self, user_id: str, conversation_id: str) -> mpb.Conversation:
        reply = await self._call(
            self._memory().GetConversation(
                mpb.GetConversationRequest(user_id=user_id, conversation_id=conversation_id),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        conversation: mpb.Conversation = reply.conversation
        return conversation

    async def get_conversation(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        found = await self._get_conversation(user_id, path_text(request, "id"))
        return JSONResponse(conversation_json(found))

    async def update_conversation(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(ConversationPatch, await self.gw.read_body(request))
        user_id = body_user_id(request, principal, body)
        paths = [
            name
            for name in ("title", "model", "provider", "metadata")
            if getattr(body, name) is not None
        ]
        if not paths:
            raise bad_request("Nothing to change: give title, model, provider or metadata.")
        reply = await self._call(
            self._memory().UpdateConversation(
                mpb.UpdateConversationRequest(
                    user_id=user_id,
                    conversation=mpb.Conversation(
                        id=path_text(request, "id"),
                        title=body.title or "",
                        model=body.model or "",
                        provider=body.provider or "",
                        metadata=body.metadata or {},
                    ),
                    update_mask=FieldMask(paths=paths),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(conversation_json(reply.conversation))

    async def delete_conversation(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        conversation_id = path_text(request, "id")
        reply = await self._call(
            self._memory().DeleteConversation(
                mpb.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            {
                "id": conversation_id,
                "object": "conversation.deleted",
                "deleted": True,
                "deleted_messages": reply.deleted_message_count,
            }
        )

    async def list_messages(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        order = request.query_params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise bad_request("'order' is 'asc' or 'desc'.", "order")
        reply = await self._call(
            self._memory().ListMessages(
                mpb.ListMessagesRequest(
                    user_id=user_id,
                    conversation_id=path_text(request, "id"),
                    page_size=int_param(request, "limit"),
                    page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
                    order_by=f"position {order}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([message_json(m) for m in reply.messages], reply.next_page_token)
        )

    async def post_turn(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        rid = current_request_id()
        principal = await gw.authorize(request, SCOPE_MEMORY)
        principal.require_scope(SCOPE_CHAT)
        # A turn is a chat: the key's limits hold and the ledger counts it.
        tally = await gw.admit(request, principal, "chat")
        body = parse_body(TurnCreate, await gw.read_body(request))
        if len(body.content.encode()) > MAX_TURN_BYTES:
            raise bad_request("'content' is larger than 1 MiB (UTF-8).", "content")
        # Checked before the model runs. The two messages are stored once under
        # it: a repeated turn runs the model again, but stores (and, unless
        # streaming, answers with) what the first one stored.
        key = idempotency_key(request)
        user_id = body_user_id(request, principal, body)
        conversation = await self._get_conversation(user_id, path_text(request, "id"))
        tally.requested = conversation.model
        if not conversation.model:
            # A valid request the conversation's state refuses: a conflict.
            raise ApiError(
                409,
                "This conversation has no model: PATCH it with one first.",
                code="conversation_has_no_model",
                param="model",
            )
        history = await self._call(
            self._memory().ListMessages(
                mpb.ListMessagesRequest(
                    user_id=user_id,
                    conversation_id=conversation.id,
                    page_size=HISTORY_MESSAGES,
                    order_by="position desc",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        messages: list[ppb.ChatMessage] = []
        if gw.settings.memory != "off":
            messages.extend(await self.memories_message(user_id, body.content))
        for m in reversed(history.messages):
            messages.append(_provider_message(m))
        messages.append(ppb.ChatMessage(role=ppb.ROLE_USER, content=body.content))
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        chat = ppb.StreamChatCompletionRequest(
            model=conversation.model,
            provider=conversation.provider,
            messages=messages,
            completion_id=completion_id,
            aggregate=not body.stream,
        )
        if body.temperature is not None:
            chat.sampling.temperature = body.temperature
        if body.max_tokens is not None:
            chat.sampling.max_tokens = body.max_tokens
        turn = _Turn(
            self, user_id, conversation, body.content, request_id=rid, key=key, tally=tally
        )
        call = gw.backends().providers.StreamChatCompletion(
            chat,
            timeout=gw.settings.request_timeout_seconds,
            metadata=principal.call_metadata(),
        )
        gw.track(call)
        streaming = False
        try:
            first = await call.read()
            if not isinstance(first, ppb.StreamChatCompletionResponse):
                raise ApiError(
                    502, "The provider ended the stream without a reply.", "server_error"
                )
            if body.stream:
                streaming = True
                return EventStreamResponse(
                    turn.events(call, first), [(b"x-request-id", rid.encode())]
                )
            turn.add(first)
            while isinstance(chunk := await call.read(), ppb.StreamChatCompletionResponse):
                turn.add(chunk)
            stored = await turn.store(partial=False)
            return JSONResponse(message_json(stored))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, rid) from None
        finally:
            if not streaming:
                gw.untrack(call)

    async def memories_message(self, user_id: str, query: str) -> list[ppb.ChatMessage]:
        return await memories_message(self.gw, user_id, query)

    def keep(self, task: asyncio.Task[None]) -> None:
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def search_messages(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        params = request.query_params
        roles = []
        for role in params.getlist("role"):
            if role not in ROLES:
                raise bad_request("'role' is one of system, user, assistant, tool.", "role")
            roles.append(ROLES[role])
        reply = await self._call(
            self._memory().SearchMessages(
                mpb.SearchMessagesRequest(
                    user_id=user_id,
                    query=params.get("q", ""),
                    conversation_id=text_query(request, "conversation_id", MAX_ID_LENGTH),
                    page_size=int_param(request, "limit"),
                    page_token=text_query(request, "page_token", MAX_PAGE_TOKEN_LENGTH),
                    mode=mode_param(request),
                    roles=roles,
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        data = [
            {
                **message_json(h.message),
                "conversation_title": h.conversation_title,
                "score": h.score,
                "snippet": h.snippets[0] if h.snippets else "",
                "snippets": list(h.snippets),
            }
            for h in reply.hits
        ]
        out = page_json(data, reply.next_page_token)
        out["mode"] = MODE_NAMES.get(reply.mode_used, "keyword")
        out["mode_note"] = reply.mode_note
        return JSONResponse(out)


def _provider_message(m: mpb.Message) -> ppb.ChatMessage:
    out = ppb.ChatMessage(
        role=TO_PROVIDER_ROLE.get(m.role, ppb.ROLE_USER),
        content=m.content,
        name=m.name,
        tool_call_id=m.tool_call_id,
    )
    for c in m.tool_calls:
        out.tool_calls.add(
            id=c.id,
            type="function",
            function=ppb.FunctionCall(name=c.function_name, arguments=c.arguments),
        )
    return out


class _Turn:
    """One conversation turn: what the model said so far, and how it is stored."""

    def __init__(
        self,
        routes: ConversationRoutes,
        user_id: str,
        conversation: mpb.Conversation,
        content: str,
        *,
        request_id: str,
        key: str,
        tally: Tally,
    ) -> None:
        self._routes = routes
        self._tally = tally
        self._user_id = user_id
        self._conversation = conversation
        self._content = content
        self._request_id = request_id
        self._key = key
        self._started = time.monotonic()
        self.parts: list[str] = []
        self.usage: ppb.Usage | None = None
        self.finish: str | None = None
        self.model = ""
        self.provider = ""
        self.stored = False

    def add(self, chunk: ppb.StreamChatCompletionResponse) -> None:
        if chunk.content:
            self.parts.append(chunk.content)
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        self.finish = FINISH_REASONS.get(chunk.finish_reason) or self.finish
        self.model = chunk.model or self.model
        self.provider = chunk.provider or self.provider

    async def store(self, *, partial: bool) -> mpb.Message:
        """Appends the user's message and the answer, then queues them for extraction."""
        self.stored = True
        if self.usage is not None:
            self._tally.add(self.model, self.usage)
        if partial:
            self._tally.failed = True
        metadata = {
            "latency_ms": str(round((time.monotonic() - self._started) * 1000)),
            "request_id": self._request_id,
        }
        if self.finish:
            metadata["finish_reason"] = self.finish
        if partial:
            metadata["partial"] = "true"
        memory = self._routes.gw.backends().memory
        timeout = self._routes.gw.settings.control_timeout_seconds
        answer = mpb.Message(
            role=mpb.MESSAGE_ROLE_ASSISTANT,
            # A message needs content: an empty answer is stored as said so.
            content="".join(self.parts) or "(no answer)",
            provider=self.provider,
            model=self.model,
            prompt_tokens=self.usage.prompt_tokens if self.usage else 0,
            completion_tokens=self.usage.completion_tokens if self.usage else 0,
            metadata=metadata,
        )
        try:
            reply = await memory.AppendMessages(
                mpb.AppendMessagesRequest(
                    user_id=self._user_id,
                    conversation_id=self._conversation.id,
                    messages=[
                        mpb.Message(role=mpb.MESSAGE_ROLE_USER, content=self._content),
                        answer,
                    ],
                    request_id=self._key,
                ),
                timeout=timeout,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise api_error(ServiceError.from_rpc_error(exc)) from None
        user_message, stored = reply.messages
        if not partial:
            await self._queue_extraction(user_message, stored)
        return stored

    async def _queue_extraction(self, user: mpb.Message, answer: mpb.Message) -> None:
        memory = self._routes.gw.backends().memory
        try:
            await memory.AddMemories(
                mpb.AddMemoriesRequest(
                    user_id=self._user_id,
                    messages=[
                        mpb.SourceMessage(role=m.role, content=m.content, message_id=m.id)
                        for m in (user, answer)
                        if m.content
                    ],
                    infer=True,
                    background=True,
                    conversation_id=self._conversation.id,
                    actor="gateway",
                    # A retried turn queues its extraction once.
                    request_id=self._key,
                ),
                timeout=self._routes.gw.settings.control_timeout_seconds,
                # The queued extraction is recorded under the key of this turn.
                metadata=outgoing_metadata()
                + identity_metadata(self._tally.principal.key_id, self._tally.principal.owner)
                + self._tally.principal.models_metadata,
            )
        except grpc.aio.AioRpcError as exc:
            # No extraction model configured, or memory busy: the turn stays stored.
            log.info(
                "turn not queued for extraction",
                extra={"code": exc.code().name, "detail": exc.details()},
            )

    async def events(
        self, call: Any, first: ppb.StreamChatCompletionResponse
    ) -> AsyncIterator[bytes]:
        created = first.created or int(time.time())
        head = {"id": first.id, "object": "chat.completion.chunk", "created": created}
        gw = self._routes.gw
        try:
            chunk = first
            while True:
                self.add(chunk)
                delta = chunk_delta(chunk)
                finish = FINISH_REASONS.get(chunk.finish_reason)
                if delta or finish:
                    yield event(chunk_payload(head, first.model, delta, finish))
                try:
                    read = await call.read()
                except grpc.aio.AioRpcError as exc:
                    yield event(from_rpc_error(exc, self._request_id).envelope())
                    await self.store(partial=True)
                    yield DONE
                    return
                if not isinstance(read, ppb.StreamChatCompletionResponse):
                    break
                chunk = read
            if self.usage is not None:
                yield event(usage_payload(head, first.model, self.usage))
            try:
                stored = await self.store(partial=False)
                yield event({"object": "conversation.message", "id": stored.id})
            except ApiError as exc:
                yield event(exc.envelope())
            yield DONE
        finally:
            call.cancel()
            gw.untrack(call)
            if not self.stored:
                # The client left mid-answer: keep what was said, marked partial.
                task = asyncio.get_running_loop().create_task(self._store_partial())
                self._routes.keep(task)

    async def _store_partial(self) -> None:
        try:
            await self.store(partial=True)
        except ApiError as exc:
            log.warning("partial answer not stored", extra={"error": exc.message})
