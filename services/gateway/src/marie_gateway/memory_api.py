"""The memory surface: `/api/conversations`, `/api/search`, `/api/memories`, over the
memory service, and the enrichment of chats with a user's memories.

Partitioning. Every route needs the `memory` scope. Data belongs to a tenant,
the key's owner (the key id when it has none); keys with the `admin` scope may
name another tenant with `tenant`. Within a tenant, the end user is the
`user` of the body or query (OpenAI's `user` field), by default the tenant
itself. The memory service sees one `user_id` that encodes both
(`<len(tenant)>:<tenant>/<user>`), so no key ever reaches another tenant's
data and no end user another's.

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
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from marie.memory.v1 import memory_service_pb2 as mpb
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit.context import outgoing_metadata
from marie_kit.errors import ServiceError
from marie_kit.identity import identity_metadata
from marie_kit.tenancy import tenant_user_id
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access import SCOPE_ADMIN, SCOPE_CHAT, SCOPE_MEMORY, Principal
from marie_gateway.access import tenant_of as key_tenant
from marie_gateway.core import Gateway
from marie_gateway.errors import ApiError, bad_request, from_rpc_error, from_service_error
from marie_gateway.mapping import (
    FINISH_REASONS,
    chunk_delta,
    chunk_payload,
    usage_payload,
)
from marie_gateway.sse import DONE, EventStreamResponse, event
from marie_gateway.usage import Tally
from marie_gateway.web import JSONResponse, current_request_id, parse_body

log = logging.getLogger("marie.gateway.memory")

T = TypeVar("T")

MAX_USER = 128
#: End users named "marie:…" are Marie's own. A tenant's stored Responses API
#: responses live under RESPONSES_USER (response_store), so no REST `user` may
#: name it: they never show among the tenant's conversations or search hits.
RESERVED_USER_PREFIX = "marie:"
RESPONSES_USER = RESERVED_USER_PREFIX + "responses"
# Messages of a conversation sent to the model with a new turn (the newest).
HISTORY_MESSAGES = 100
ROLES = {
    "system": mpb.MESSAGE_ROLE_SYSTEM,
    "user": mpb.MESSAGE_ROLE_USER,
    "assistant": mpb.MESSAGE_ROLE_ASSISTANT,
    "tool": mpb.MESSAGE_ROLE_TOOL,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
TO_PROVIDER_ROLE = {
    mpb.MESSAGE_ROLE_SYSTEM: ppb.ROLE_SYSTEM,
    mpb.MESSAGE_ROLE_USER: ppb.ROLE_USER,
    mpb.MESSAGE_ROLE_ASSISTANT: ppb.ROLE_ASSISTANT,
    mpb.MESSAGE_ROLE_TOOL: ppb.ROLE_TOOL,
}
MODES = {
    "hybrid": mpb.SEARCH_MODE_HYBRID,
    "vector": mpb.SEARCH_MODE_VECTOR,
    "keyword": mpb.SEARCH_MODE_KEYWORD,
}
MODE_NAMES = {v: k for k, v in MODES.items()}
EVENT_NAMES = {
    mpb.MEMORY_EVENT_ADD: "ADD",
    mpb.MEMORY_EVENT_UPDATE: "UPDATE",
    mpb.MEMORY_EVENT_DELETE: "DELETE",
    mpb.MEMORY_EVENT_NONE: "NONE",
}
# The memory service's field names, as this surface calls them.
FIELD_NAMES = {
    "user_id": "user",
    "query": "q",
    "page_size": "limit",
    "update_mask": "body",
    "score_threshold": "threshold",
}
MEMORY_PREAMBLE = "Relevant facts about the user, from earlier conversations:"


# --------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _UserBody(_Body):
    user: str | None = Field(default=None, max_length=MAX_USER)
    tenant: str | None = Field(default=None, max_length=256)


class ConversationCreate(_UserBody):
    title: str = Field(default="", max_length=256)
    model: str = Field(default="", max_length=256)
    provider: str = Field(default="", max_length=256)
    metadata: dict[str, str] = Field(default_factory=dict)


class ConversationPatch(_UserBody):
    title: str | None = Field(default=None, max_length=256)
    model: str | None = Field(default=None, max_length=256)
    provider: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None


class TurnCreate(_UserBody):
    content: str = Field(min_length=1)
    stream: bool = True
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)


class SourceMessageBody(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(min_length=1)


class MemoriesCreate(_UserBody):
    messages: list[SourceMessageBody] = Field(min_length=1, max_length=100)
    infer: bool = True
    background: bool = False
    categories: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    conversation_id: str = ""
    model: str = ""


class MemoryPatch(_UserBody):
    text: str | None = None
    categories: list[str] | None = None
    metadata: dict[str, str] | None = None


# --------------------------------------------------------------------------
# JSON shapes
# --------------------------------------------------------------------------


def _time(ts: Any) -> int:
    return int(ts.seconds)


def conversation_json(c: mpb.Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "object": "conversation",
        "title": c.title,
        "provider": c.provider,
        "model": c.model,
        "message_count": c.message_count,
        "metadata": dict(c.metadata),
        "created_at": _time(c.create_time),
        "updated_at": _time(c.update_time),
    }


def message_json(m: mpb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id,
        "object": "conversation.message",
        "conversation_id": m.conversation_id,
        "position": m.position,
        "role": ROLE_NAMES.get(m.role, "user"),
        "content": m.content,
        "provider": m.provider,
        "model": m.model,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "metadata": dict(m.metadata),
        "created_at": _time(m.create_time),
    }
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function_name, "arguments": c.arguments},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def memory_json(m: mpb.Memory) -> dict[str, Any]:
    return {
        "id": m.id,
        "object": "memory",
        "text": m.text,
        "categories": list(m.categories),
        "metadata": dict(m.metadata),
        "source_conversation_id": m.source_conversation_id,
        "source_message_ids": list(m.source_message_ids),
        "hash": m.hash,
        "created_at": _time(m.create_time),
        "updated_at": _time(m.update_time),
    }


def history_json(e: mpb.MemoryHistoryEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "memory_id": e.memory_id,
        "event": EVENT_NAMES.get(e.event, "NONE"),
        "old_text": e.old_text,
        "new_text": e.new_text,
        "actor": e.actor,
        "inferred": e.inferred,
        "created_at": _time(e.create_time),
    }


def page_json(data: list[dict[str, Any]], token: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "next_page_token": token}


# --------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------


def tenant_of(principal: Principal, requested: str | None) -> str:
    """The tenant whose data a request reaches: the key's owner (or key id); an
    admin key may name another."""
    own = key_tenant(principal)
    if requested and requested != own:
        if SCOPE_ADMIN not in principal.scopes:
            raise ApiError(
                403,
                "Only keys with the 'admin' scope may name a tenant.",
                "permission_error",
                "permission_denied",
                "tenant",
            )
        return requested
    return own


def user_id_of(principal: Principal, user: str | None, tenant: str | None) -> str:
    """The memory service's `user_id` for an end user of the caller's tenant."""
    owner = tenant_of(principal, tenant)
    if user is not None and not user:
        raise bad_request("'user' must not be empty.", "user")
    if user is not None and len(user) > MAX_USER:
        raise bad_request(f"'user' is longer than {MAX_USER} characters.", "user")
    if user is not None and user.startswith(RESERVED_USER_PREFIX):
        raise bad_request(
            f"'user' names starting with '{RESERVED_USER_PREFIX}' are reserved.", "user"
        )
    end_user = user if user is not None else owner
    encoded = tenant_user_id(owner, end_user)
    if len(encoded) > 256:
        raise bad_request("'user' is too long for this tenant.", "user")
    return encoded


def responses_user_id(principal: Principal) -> str:
    """The memory service's `user_id` holding the caller's tenant's stored responses."""
    return tenant_user_id(key_tenant(principal), RESPONSES_USER)


def _int_param(request: Request, name: str, default: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f"'{name}' must be an integer.", name) from None


def _float_param(request: Request, name: str) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise bad_request(f"'{name}' must be a number.", name) from None


def _mode_param(request: Request) -> mpb.SearchMode:
    raw = request.query_params.get("mode", "")
    if not raw:
        return mpb.SEARCH_MODE_UNSPECIFIED
    if raw not in MODES:
        raise bad_request("'mode' is one of hybrid, vector, keyword.", "mode")
    return MODES[raw]


def _api_error(error: ServiceError) -> ApiError:
    field = error.metadata.get("field")
    if field is not None:
        head, dot, rest = field.partition(".")
        renamed = FIELD_NAMES.get(head, head)
        if head in ("conversation", "memory"):
            renamed = rest or head
            dot, rest = "", ""
        error.metadata["field"] = renamed + dot + rest
    api = from_service_error(error, current_request_id())
    if api.status in (400, 404) and error.domain == "marie.memory":
        api.code = error.reason.lower()
    return api


# --------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------


class MemoryRoutes:
    """Handlers of the `/api` routes over the memory service."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
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
            Route("/api/memories", self.add_memories, methods=["POST"]),
            Route("/api/memories", self.list_memories, methods=["GET"]),
            Route("/api/memories", self.delete_all_memories, methods=["DELETE"]),
            Route("/api/memories/search", self.search_memories, methods=["GET"]),
            Route("/api/memories/{id}", self.get_memory, methods=["GET"]),
            Route("/api/memories/{id}", self.update_memory, methods=["PATCH"]),
            Route("/api/memories/{id}", self.delete_memory, methods=["DELETE"]),
            Route("/api/memories/{id}/history", self.memory_history, methods=["GET"]),
        ]

    # --- plumbing ---------------------------------------------------------

    async def _principal(self, request: Request) -> Principal:
        return await self.gw.enter(request, SCOPE_MEMORY)

    async def _query_user(self, request: Request) -> str:
        principal = await self._principal(request)
        params = request.query_params
        return user_id_of(principal, params.get("user"), params.get("tenant"))

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise _api_error(ServiceError.from_rpc_error(exc)) from None

    def _timeout(self) -> float:
        return self.gw.settings.control_timeout_seconds

    def _memory(self) -> Any:
        return self.gw.backends().memory

    # --- conversations ----------------------------------------------------

    async def create_conversation(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(ConversationCreate, await self.gw.read_body(request))
        user_id = user_id_of(principal, body.user, body.tenant)
        reply = await self._call(
            self._memory().CreateConversation(
                mpb.CreateConversationRequest(
                    user_id=user_id,
                    title=body.title,
                    provider=body.provider,
                    model=body.model,
                    metadata=body.metadata,
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
                    page_size=_int_param(request, "limit"),
                    page_token=request.query_params.get("page_token", ""),
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
        found = await self._get_conversation(user_id, request.path_params["id"])
        return JSONResponse(conversation_json(found))

    async def update_conversation(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(ConversationPatch, await self.gw.read_body(request))
        user_id = user_id_of(principal, body.user, body.tenant)
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
                        id=request.path_params["id"],
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
        conversation_id = request.path_params["id"]
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
                    conversation_id=request.path_params["id"],
                    page_size=_int_param(request, "limit"),
                    page_token=request.query_params.get("page_token", ""),
                    order_by=f"position {order}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([message_json(m) for m in reply.messages], reply.next_page_token)
        )

    # --- a conversation turn ----------------------------------------------

    async def post_turn(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        rid = current_request_id()
        principal = await gw.authorize(request, SCOPE_MEMORY)
        principal.require_scope(SCOPE_CHAT)
        # A turn is a chat: the key's limits hold and the ledger counts it.
        tally = await gw.admit(request, principal, "chat")
        body = parse_body(TurnCreate, await gw.read_body(request))
        user_id = user_id_of(principal, body.user, body.tenant)
        conversation = await self._get_conversation(user_id, request.path_params["id"])
        tally.requested = conversation.model
        if not conversation.model:
            raise bad_request("This conversation has no model: PATCH it with one first.", "model")
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
        turn = _Turn(self, user_id, conversation, body.content, request_id=rid, tally=tally)
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

    # --- search -----------------------------------------------------------

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
                    conversation_id=params.get("conversation_id", ""),
                    page_size=_int_param(request, "limit"),
                    page_token=params.get("page_token", ""),
                    mode=_mode_param(request),
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

    # --- memories ---------------------------------------------------------

    async def add_memories(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(MemoriesCreate, await self.gw.read_body(request))
        user_id = user_id_of(principal, body.user, body.tenant)
        reply = await self._call(
            self._memory().AddMemories(
                mpb.AddMemoriesRequest(
                    user_id=user_id,
                    messages=[
                        mpb.SourceMessage(role=ROLES[m.role], content=m.content)
                        for m in body.messages
                    ],
                    infer=body.infer,
                    background=body.background,
                    categories=body.categories,
                    metadata=body.metadata,
                    conversation_id=body.conversation_id,
                    extraction_model=body.model,
                    actor=f"key:{principal.key_id}",
                ),
                # Inference can take seconds: the chat deadline, not the control one.
                timeout=self.gw.settings.request_timeout_seconds,
                # Extraction's model calls are recorded under this key.
                metadata=outgoing_metadata()
                + identity_metadata(principal.key_id, principal.owner)
                + principal.models_metadata,
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "event": EVENT_NAMES.get(r.event, "NONE"),
                        **memory_json(r.memory),
                        "previous_text": r.previous_text,
                    }
                    for r in reply.results
                ],
                "extraction_model": reply.extraction_model,
                "job_id": reply.job_id,
            }
        )

    async def list_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        params = request.query_params
        reply = await self._call(
            self._memory().ListMemories(
                mpb.ListMemoriesRequest(
                    user_id=user_id,
                    page_size=_int_param(request, "limit"),
                    page_token=params.get("page_token", ""),
                    filter=mpb.MemoryFilter(
                        categories=params.getlist("category"),
                        source_conversation_id=params.get("conversation_id", ""),
                    ),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([memory_json(m) for m in reply.memories], reply.next_page_token)
        )

    async def search_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        params = request.query_params
        reply = await self._call(
            self._memory().SearchMemories(
                mpb.SearchMemoriesRequest(
                    user_id=user_id,
                    query=params.get("q", ""),
                    top_k=_int_param(request, "top_k"),
                    score_threshold=_float_param(request, "threshold"),
                    mode=_mode_param(request),
                    filter=mpb.MemoryFilter(
                        categories=params.getlist("category"),
                        source_conversation_id=params.get("conversation_id", ""),
                    ),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [{**memory_json(r.memory), "score": r.score} for r in reply.results],
                "mode": MODE_NAMES.get(reply.mode_used, "keyword"),
                "mode_note": reply.mode_note,
            }
        )

    async def get_memory(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().GetMemory(
                mpb.GetMemoryRequest(user_id=user_id, memory_id=request.path_params["id"]),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(memory_json(reply.memory))

    async def update_memory(self, request: Request) -> Response:
        principal = await self._principal(request)
        body = parse_body(MemoryPatch, await self.gw.read_body(request))
        user_id = user_id_of(principal, body.user, body.tenant)
        paths = [n for n in ("text", "categories", "metadata") if getattr(body, n) is not None]
        if not paths:
            raise bad_request("Nothing to change: give text, categories or metadata.")
        reply = await self._call(
            self._memory().UpdateMemory(
                mpb.UpdateMemoryRequest(
                    user_id=user_id,
                    memory=mpb.Memory(
                        id=request.path_params["id"],
                        text=body.text or "",
                        categories=body.categories or [],
                        metadata=body.metadata or {},
                    ),
                    update_mask=FieldMask(paths=paths),
                    actor=f"key:{principal.key_id}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(memory_json(reply.memory))

    async def delete_memory(self, request: Request) -> Response:
        principal = await self._principal(request)
        params = request.query_params
        user_id = user_id_of(principal, params.get("user"), params.get("tenant"))
        memory_id = request.path_params["id"]
        await self._call(
            self._memory().DeleteMemory(
                mpb.DeleteMemoryRequest(
                    user_id=user_id,
                    memory_id=memory_id,
                    erase_history=params.get("erase_history") in ("1", "true"),
                    actor=f"key:{principal.key_id}",
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse({"id": memory_id, "object": "memory.deleted", "deleted": True})

    async def delete_all_memories(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().DeleteAllMemories(
                mpb.DeleteAllMemoriesRequest(user_id=user_id),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse({"object": "memory.deleted", "deleted": reply.deleted_count})

    async def memory_history(self, request: Request) -> Response:
        user_id = await self._query_user(request)
        reply = await self._call(
            self._memory().GetMemoryHistory(
                mpb.GetMemoryHistoryRequest(
                    user_id=user_id,
                    memory_id=request.path_params["id"],
                    page_size=_int_param(request, "limit"),
                    page_token=request.query_params.get("page_token", ""),
                ),
                timeout=self._timeout(),
                metadata=outgoing_metadata(),
            )
        )
        return JSONResponse(
            page_json([history_json(e) for e in reply.entries], reply.next_page_token)
        )


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
        routes: MemoryRoutes,
        user_id: str,
        conversation: mpb.Conversation,
        content: str,
        *,
        request_id: str,
        tally: Tally,
    ) -> None:
        self._routes = routes
        self._tally = tally
        self._user_id = user_id
        self._conversation = conversation
        self._content = content
        self._request_id = request_id
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
            self._tally.add(self.model, self.usage.prompt_tokens, self.usage.completion_tokens)
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
                ),
                timeout=timeout,
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise _api_error(ServiceError.from_rpc_error(exc)) from None
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


async def memories_message(gw: Gateway, user_id: str, query: str) -> list[ppb.ChatMessage]:
    """A system message with the user's most relevant memories, or nothing when
    there are none or the memory service does not answer within its deadline."""
    settings = gw.settings
    try:
        reply = await gw.backends().memory.SearchMemories(
            mpb.SearchMemoriesRequest(
                user_id=user_id, query=query[:4096], top_k=settings.memory_top_k
            ),
            timeout=settings.memory_timeout_seconds,
            metadata=outgoing_metadata(),
        )
    except grpc.aio.AioRpcError as exc:
        log.warning("chat goes on without memories", extra={"code": exc.code().name})
        return []
    if not reply.results:
        return []
    lines = "\n".join(f"- {r.memory.text}" for r in reply.results)
    return [ppb.ChatMessage(role=ppb.ROLE_SYSTEM, content=f"{MEMORY_PREAMBLE}\n{lines}")]


async def enrich_chat(
    gw: Gateway, principal: Principal, user: str | None, request: ppb.StreamChatCompletionRequest
) -> None:
    """With MARIE_GATEWAY_MEMORY=all, adds the memories of the request's `user` (in the
    key's tenant) to a `/v1/chat/completions` call, for keys with the `memory` scope."""
    if gw.settings.memory != "all" or not user:
        return
    if SCOPE_MEMORY not in principal.scopes and SCOPE_ADMIN not in principal.scopes:
        return
    query = next(
        (m.content for m in reversed(request.messages) if m.role == ppb.ROLE_USER and m.content),
        "",
    )
    if not query or len(user) > MAX_USER or user.startswith(RESERVED_USER_PREFIX):
        return  # no memories to add for a user no memory route can name
    added = await memories_message(gw, user_id_of(principal, user, None), query)
    if added:
        messages = [*added, *request.messages]
        del request.messages[:]
        request.messages.extend(messages)
