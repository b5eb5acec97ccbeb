"""The memory service as the `/api` routes call it: its errors under this
surface's field names, the query parameters every route reads, and the JSON
shapes of its records. Every route needs the `memory` scope; whose data it
reaches is `access/tenancy.py`'s rule."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import grpc
from marie.memory.v1 import memory_service_pb2 as mpb
from marie_kit.errors import ServiceError
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from marie_gateway.access.keys import SCOPE_MEMORY, Principal
from marie_gateway.access.tenancy import MAX_TENANT, MAX_USER, USER_SCHEMA, user_id_of
from marie_gateway.core import Gateway
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, bad_request, from_service_error
from marie_gateway.http.params import INT32_MAX, float_query, int_query

T = TypeVar("T")

ROLES = {
    "system": mpb.MESSAGE_ROLE_SYSTEM,
    "user": mpb.MESSAGE_ROLE_USER,
    "assistant": mpb.MESSAGE_ROLE_ASSISTANT,
    "tool": mpb.MESSAGE_ROLE_TOOL,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _UserBody(_Body):
    user: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_USER,
        json_schema_extra={"not": USER_SCHEMA["not"]},  # type: ignore[dict-item]
    )
    tenant: str | None = Field(default=None, max_length=MAX_TENANT)


def some_of(*names: str) -> dict[str, Any]:
    """JSON Schema for a PATCH body: at least one of `names`, not null (a
    request changing nothing is a 400)."""
    return {
        "anyOf": [
            {"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names
        ]
    }


#: The memory service's bounds on metadata (32 entries, keys of 1 to 64
#: characters, values of at most 512).
Metadata = Annotated[
    dict[str, str],
    Field(
        max_length=32,
        json_schema_extra={
            "propertyNames": {"minLength": 1, "maxLength": 64},
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
    ),
]


#: The header that makes a write idempotent, and its longest value (the memory
#: service's request_id).
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 128
#: The longest request id the memory service stores.
MAX_REQUEST_ID = 128


def idempotency_key(request: Request) -> str:
    """The request's Idempotency-Key (400 when malformed), else a key of this
    request alone: a write the channel retries on another memory replica is
    applied once either way, and a client that sends the key may retry the
    request itself. Not the request id: a client may repeat its X-Request-Id
    over different writes, which must not fold into one."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return "gw:" + secrets.token_hex(16)
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in value):
        raise bad_request(
            f"'Idempotency-Key' is 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
            "Idempotency-Key",
        )
    if len(value) <= MAX_REQUEST_ID - len("key:"):
        return "key:" + value
    # The memory service keeps request ids in 128 characters: a key too long
    # for its prefix is named by its digest (another prefix, so no clash).
    return "keyh:" + hashlib.sha256(value.encode()).hexdigest()


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


JOB_STATES = {
    mpb.EXTRACTION_JOB_STATE_QUEUED: "queued",
    mpb.EXTRACTION_JOB_STATE_SUCCEEDED: "succeeded",
    mpb.EXTRACTION_JOB_STATE_FAILED: "failed",
}


def change_json(r: mpb.AddMemoriesResult) -> dict[str, Any]:
    return {
        "event": EVENT_NAMES.get(r.event, "NONE"),
        **memory_json(r.memory),
        "previous_text": r.previous_text,
    }


def job_json(j: mpb.ExtractionJob) -> dict[str, Any]:
    return {
        "id": j.id,
        "object": "memory.extraction_job",
        "status": JOB_STATES.get(j.state, "queued"),
        "attempts": j.attempts,
        "last_error": j.last_error,
        "failure_reason": j.failure_reason or None,
        "created_at": _time(j.create_time),
        "next_attempt_at": _time(j.next_attempt_time) if j.HasField("next_attempt_time") else None,
        "finished_at": _time(j.finish_time) if j.HasField("finish_time") else None,
        "data": [change_json(r) for r in j.results],
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


def _given_once(body: str | None, query: str | None, name: str) -> str | None:
    if body is not None and query is not None and body != query:
        raise bad_request(
            f"'{name}' is given in the query and in the body, with different values.", name
        )
    return body if body is not None else query


def body_user_id(request: Request, principal: Principal, body: _UserBody) -> str:
    """The memory service's user id of a request with a body: `user` and
    `tenant` may come in the body or the query (as on the routes without a
    body), and must agree when they come in both."""
    params = request.query_params
    user = _given_once(body.user, params.get("user"), "user")
    tenant = _given_once(body.tenant, params.get("tenant"), "tenant")
    return user_id_of(principal, user, tenant)


def page_json(data: list[dict[str, Any]], token: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "next_page_token": token}


def int_param(request: Request, name: str) -> int:
    """A page size or `top_k`: 0 (the default) to the largest int32; the
    memory service cuts sizes above its maximum to it."""
    return int_query(request, name, minimum=0, maximum=INT32_MAX)


def float_param(request: Request, name: str) -> float:
    """A score threshold: a finite number from 0 to 1."""
    return float_query(request, name, minimum=0.0, maximum=1.0)


def mode_param(request: Request) -> mpb.SearchMode:
    raw = request.query_params.get("mode", "")
    if not raw:
        return mpb.SEARCH_MODE_UNSPECIFIED
    if raw not in MODES:
        raise bad_request("'mode' is one of hybrid, vector, keyword.", "mode")
    return MODES[raw]


def api_error(error: ServiceError) -> ApiError:
    field = error.metadata.get("field")
    if field is not None:
        head, dot, rest = field.partition(".")
        renamed = FIELD_NAMES.get(head, head)
        if head in ("conversation", "memory"):
            renamed = rest or head
            dot, rest = "", ""
        error.metadata["field"] = renamed + dot + rest
    api = from_service_error(error, current_request_id())
    # The memory service's reasons say more than the status (e.g.
    # `conversation_not_found`), but a bad field is `invalid_value` on every route.
    own = api.status in (400, 404) and error.domain == "marie.memory"
    if own and error.reason != "INVALID_ARGUMENT":
        api.code = error.reason.lower()
    return api


class MemoryCalls:
    """What the routes over the memory service share: the caller, its end user,
    and calls whose errors come back in this surface's names."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

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
            raise api_error(ServiceError.from_rpc_error(exc)) from None

    def _timeout(self) -> float:
        return self.gw.settings.control_timeout_seconds

    def _memory(self) -> Any:
        return self.gw.backends().memory
