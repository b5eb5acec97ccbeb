"""Marie's own `/api` routes as the OpenAPI document shows them: one entry per
route and method."""

from __future__ import annotations

from typing import Any

from marie_gateway.access.keys import SCOPE_ADMIN, SCOPE_CHAT, SCOPE_MEMORY, SCOPE_MODELS
from marie_gateway.access.tenancy import MAX_TENANT, USER_SCHEMA
from marie_gateway.api import budgets, conversations, keys, memories, schemas
from marie_gateway.api.memory_client import MODES, ROLES
from marie_gateway.api.models import CAPABILITY_BY_NAME, MAX_PROVIDER_LENGTH, MAX_SEARCH_LIMIT
from marie_gateway.http.openapi import ANY_KEY, Operation, Param
from marie_gateway.http.params import (
    INT32_MAX,
    MAX_ID_LENGTH,
    MAX_MODEL_LENGTH,
    MAX_PAGE_TOKEN_LENGTH,
)
from marie_gateway.openai.schemas import ChatCompletionChunk

_REFRESH = Param("refresh", "true forces a refresh of the providers' model lists.", type="boolean")

_USER = Param(
    "user", "The end user within the key's tenant (default: the tenant).", schema=USER_SCHEMA
)
_TENANT = Param(
    "tenant",
    "Another tenant (keys with the admin scope only).",
    schema={"maxLength": MAX_TENANT},
)
_PAGE = (
    Param(
        "limit",
        "Page size (0: the default; above the largest, the largest).",
        type="integer",
        schema={"minimum": 0, "maximum": INT32_MAX},
    ),
    Param(
        "page_token",
        "From the previous page's next_page_token.",
        schema={"maxLength": MAX_PAGE_TOKEN_LENGTH},
    ),
)
_QUERY = Param("q", "What to look for.", True, schema={"minLength": 1, "maxLength": 4096})
_MODE = Param("mode", "hybrid, vector or keyword.", schema={"enum": ["", *MODES]})
_CATEGORY = Param("category", "Only these categories (repeatable).", schema={"maxLength": 64})
_CONVERSATION = Param(
    "conversation_id", "Only this conversation.", schema={"maxLength": MAX_ID_LENGTH}
)
_WHO = (_USER, _TENANT)
# A time from 1970 to 9999 as /api/usage reads it: unix seconds, an ISO 8601
# date, or a date and time with seconds and a zone.
_YEAR = "(19[7-9][0-9]|[2-9][0-9]{3})"
_TIME: dict[str, Any] = {
    "anyOf": [
        {"const": ""},
        {"pattern": r"^[0-9]{1,11}(\.[0-9]{1,6})?$"},
        {"format": "date", "pattern": f"^{_YEAR}-[0-9]{{2}}-[0-9]{{2}}$"},
        {
            "format": "date-time",
            "pattern": f"^{_YEAR}-[0-9]{{2}}-[0-9]{{2}}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
            r"(\.[0-9]{1,6})?(Z|\+00:00)$",
        },
    ]
}
_IDEMPOTENT = (
    Param(
        "Idempotency-Key",
        "Makes a retry take effect once: a request repeating a key (1 to 128 printable "
        "ASCII characters) of the same user stores nothing new and answers with what "
        "the first one stored (a repeated turn runs the model again; a streamed one "
        "shows the new answer, the stored one is the first). Without it, each request "
        "is its own.",
    ),
)
_C = "/api/conversations"
_M = "/api/memories"

#: The memory routes: keyword arguments of `Operation` (its `query` as tuples).
_MEMORY_ROUTES: tuple[dict[str, Any], ...] = (
    {
        "path": _C,
        "method": "post",
        "summary": "Create a conversation",
        "request": conversations.ConversationCreate,
        "response": schemas.ConversationOut,
        "status": "201",
        "headers": _IDEMPOTENT,
    },
    {
        "path": _C,
        "method": "get",
        "summary": "The user's conversations, newest first",
        "response": schemas.ConversationList,
        "query": (
            *_WHO,
            *_PAGE,
            Param(
                "order",
                "created (default) or updated.",
                schema={"enum": ["", "created", "updated"]},
            ),
        ),
    },
    {
        "path": _C + "/{id}",
        "method": "get",
        "summary": "One conversation",
        "response": schemas.ConversationOut,
        "query": _WHO,
    },
    {
        "path": _C + "/{id}",
        "method": "patch",
        "summary": "Change title, model, provider, metadata",
        "request": conversations.ConversationPatch,
        "response": schemas.ConversationOut,
    },
    {
        "path": _C + "/{id}",
        "method": "delete",
        "summary": "Delete a conversation and its messages",
        "response": schemas.ConversationDeleted,
        "query": _WHO,
    },
    {
        "path": _C + "/{id}/messages",
        "method": "get",
        "summary": "A conversation's messages",
        "response": schemas.MessageList,
        "query": (
            *_WHO,
            *_PAGE,
            Param("order", "asc (default) or desc.", schema={"enum": ["asc", "desc"]}),
        ),
    },
    {
        "path": _C + "/{id}/messages",
        "method": "post",
        "summary": "Send a message: the answer streams (SSE), both turns are stored after it",
        "request": conversations.TurnCreate,
        "response": schemas.MessageOut,
        "events": ChatCompletionChunk,
        "more_errors": {"409": "The conversation has no model yet (PATCH it with one)"},
        "headers": _IDEMPOTENT,
    },
    {
        "path": "/api/search",
        "method": "get",
        "summary": "Search the user's messages",
        "response": schemas.MessageSearchResults,
        "query": (
            _QUERY,
            *_WHO,
            *_PAGE,
            _CONVERSATION,
            Param("role", "Only this role (repeatable).", schema={"enum": list(ROLES)}),
            _MODE,
        ),
    },
    {
        "path": _M,
        "method": "post",
        "summary": "Remember from messages (extracted or verbatim)",
        "request": memories.MemoriesCreate,
        "response": schemas.MemoriesAdded,
        "headers": _IDEMPOTENT,
    },
    {
        "path": _M,
        "method": "get",
        "summary": "The user's memories, newest first",
        "response": schemas.MemoryList,
        "query": (
            *_WHO,
            *_PAGE,
            _CATEGORY,
            Param(
                "conversation_id",
                "Only memories from this conversation.",
                schema={"maxLength": MAX_ID_LENGTH},
            ),
        ),
    },
    {
        "path": _M,
        "method": "delete",
        "summary": "Erase every memory of the user",
        "response": schemas.MemoriesErased,
        "query": _WHO,
    },
    {
        "path": _M + "/search",
        "method": "get",
        "summary": "Search the user's memories",
        "response": schemas.MemorySearchResults,
        "query": (
            _QUERY,
            *_WHO,
            Param(
                "top_k",
                "At most this many (0: the default, 10).",
                type="integer",
                schema={"minimum": 0, "maximum": INT32_MAX},
            ),
            Param(
                "threshold",
                "Minimum score, 0 to 1.",
                type="number",
                schema={"minimum": 0, "maximum": 1},
            ),
            _MODE,
            _CATEGORY,
        ),
    },
    {
        "path": _M + "/jobs/{id}",
        "method": "get",
        "summary": "A background extraction: queued, succeeded (its changes) or failed (why)",
        "response": schemas.ExtractionJobOut,
        "query": _WHO,
    },
    {
        "path": _M + "/{id}",
        "method": "get",
        "summary": "One memory",
        "response": schemas.MemoryOut,
        "query": _WHO,
    },
    {
        "path": _M + "/{id}",
        "method": "patch",
        "summary": "Change text, categories, metadata",
        "request": memories.MemoryPatch,
        "response": schemas.MemoryOut,
    },
    {
        "path": _M + "/{id}",
        "method": "delete",
        "summary": "Delete one memory",
        "response": schemas.MemoryDeleted,
        "query": (*_WHO, Param("erase_history", "true also erases its history.", type="boolean")),
    },
    {
        "path": _M + "/{id}/history",
        "method": "get",
        "summary": "Every change of a memory",
        "response": schemas.HistoryList,
        "query": (*_WHO, *_PAGE),
    },
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/api/models",
        "get",
        "Every model, grouped by provider",
        "Models",
        SCOPE_MODELS,
        response=schemas.ModelsByProvider,
        query=(_REFRESH,),
    ),
    Operation(
        "/api/models/search",
        "get",
        "Search models by id, name, description, family and capability",
        "Models",
        SCOPE_MODELS,
        response=schemas.ModelSearchResults,
        query=(
            Param(
                "q",
                "Words that must all match.",
                required=True,
                schema={"maxLength": MAX_MODEL_LENGTH, "pattern": r"\S"},
            ),
            Param(
                "provider",
                "Only this provider's models.",
                schema={"maxLength": MAX_PROVIDER_LENGTH},
            ),
            Param(
                "capability",
                "chat, completion, embeddings, tools or vision.",
                schema={"enum": ["", *CAPABILITY_BY_NAME]},
            ),
            Param(
                "limit",
                "At most this many (1-200, default 50).",
                type="integer",
                schema={"minimum": 1, "maximum": MAX_SEARCH_LIMIT},
            ),
        ),
    ),
    Operation(
        "/api/models/providers",
        "get",
        "Configured providers",
        "Models",
        SCOPE_MODELS,
        response=schemas.ProvidersList,
    ),
    Operation(
        "/api/models/providers/health",
        "get",
        "Health of every provider",
        "Models",
        SCOPE_MODELS,
        response=schemas.ProvidersHealth,
    ),
    Operation(
        "/api/models/{provider}",
        "get",
        "One provider's models",
        "Models",
        SCOPE_MODELS,
        response=schemas.ProviderModels,
        query=(_REFRESH,),
        path_params={"provider": {"maxLength": MAX_PROVIDER_LENGTH}},
    ),
    Operation(
        "/api/models/{provider}/{model:path}",
        "get",
        "One model (names may contain '/' and ':')",
        "Models",
        SCOPE_MODELS,
        response=schemas.MarieModel,
        path_params={
            "provider": {"maxLength": MAX_PROVIDER_LENGTH},
            "model": {"maxLength": MAX_MODEL_LENGTH},
        },
    ),
    Operation(
        "/api/compare",
        "post",
        "One prompt on several models, streamed side by side",
        "Compare",
        SCOPE_CHAT,
        schemas.CompareRequest,
        events=schemas.CompareEvent,
    ),
    *(
        Operation(
            spec["path"],
            spec["method"],
            spec["summary"],
            "Memory",
            SCOPE_MEMORY,
            spec.get("request"),
            spec.get("response"),
            spec.get("events"),
            spec.get("query", ()),
            status=spec.get("status", "200"),
            more_errors=spec.get("more_errors", {}),
            headers=spec.get("headers", ()),
        )
        for spec in _MEMORY_ROUTES
    ),
    Operation(
        "/api/usage",
        "get",
        "Usage totals: the caller's own key; any key or owner with `admin`",
        "Usage",
        ANY_KEY,
        response=schemas.UsageReport,
        query=(
            Param(
                "from",
                "Start, inclusive: ISO 8601 date or time (UTC), or unix seconds; "
                "default 30 days before `to`.",
                schema=_TIME,
            ),
            Param("to", "End, exclusive, after `from`; default now.", schema=_TIME),
            Param(
                "group_by",
                "day, model, key or owner; none: only the totals.",
                schema={"enum": ["", "day", "model", "key", "owner"]},
            ),
            Param(
                "key_id",
                "Only this key (admin, or the caller's own).",
                schema={"maxLength": MAX_ID_LENGTH},
            ),
            Param("owner", "Only this owner's keys (admin).", schema={"maxLength": 256}),
        ),
    ),
    Operation(
        "/api/budgets",
        "get",
        "List the keys and owners that have a budget, with what they spent",
        "Budgets",
        SCOPE_ADMIN,
        response=schemas.BudgetList,
        query=(
            Param(
                "page_size",
                "1 to 500, default 50.",
                type="integer",
                schema={"minimum": 1, "maximum": 500},
            ),
            Param(
                "page_token", "From the previous page.", schema={"maxLength": MAX_PAGE_TOKEN_LENGTH}
            ),
        ),
    ),
    Operation(
        "/api/budgets/keys/{key_id}",
        "get",
        "A key's budget and what it spent today and this month (its own, or any with admin)",
        "Budgets",
        ANY_KEY,
        response=schemas.BudgetOut,
    ),
    Operation(
        "/api/budgets/keys/{key_id}",
        "patch",
        "Set or clear a key's daily and monthly spend limits",
        "Budgets",
        SCOPE_ADMIN,
        budgets.BudgetPatch,
        schemas.BudgetOut,
    ),
    Operation(
        "/api/budgets/owners/{owner:path}",
        "get",
        "An owner's budget (over all its keys) and what it spent",
        "Budgets",
        SCOPE_ADMIN,
        response=schemas.BudgetOut,
        path_params={"owner": {"minLength": 1, "maxLength": 256}},
    ),
    Operation(
        "/api/budgets/owners/{owner:path}",
        "patch",
        "Set or clear an owner's daily and monthly spend limits",
        "Budgets",
        SCOPE_ADMIN,
        budgets.BudgetPatch,
        schemas.BudgetOut,
        path_params={"owner": {"minLength": 1, "maxLength": 256}},
    ),
    Operation(
        "/api/keys",
        "post",
        "Create a key (its plaintext is in this answer only)",
        "Keys",
        SCOPE_ADMIN,
        keys.CreateKeyRequest,
        schemas.CreatedApiKey,
    ),
    Operation(
        "/api/keys",
        "get",
        "List keys, newest first, page by page",
        "Keys",
        SCOPE_ADMIN,
        response=schemas.ApiKeyList,
        query=(
            Param("owner", "Only this owner's keys.", schema={"maxLength": 256}),
            Param("include_inactive", "true includes revoked and expired keys.", type="boolean"),
            Param(
                "page_size",
                "1 to 500, default 50.",
                type="integer",
                schema={"minimum": 1, "maximum": 500},
            ),
            Param(
                "page_token",
                "next_page_token of the previous page.",
                schema={"maxLength": MAX_PAGE_TOKEN_LENGTH},
            ),
        ),
    ),
    Operation(
        "/api/keys/{key_id}", "get", "One key", "Keys", SCOPE_ADMIN, response=schemas.ApiKeyOut
    ),
    Operation(
        "/api/keys/{key_id}",
        "patch",
        "Change a key's settings (only the fields sent)",
        "Keys",
        SCOPE_ADMIN,
        keys.KeyPatch,
        schemas.ApiKeyOut,
        more_errors={"409": "The key is revoked"},
    ),
    Operation(
        "/api/keys/{key_id}",
        "delete",
        "Revoke a key, at once and for good",
        "Keys",
        SCOPE_ADMIN,
        response=schemas.ApiKeyOut,
    ),
    Operation(
        "/api/keys/{key_id}/rotate",
        "post",
        "Replace a key's secret (the new plaintext is in this answer only)",
        "Keys",
        SCOPE_ADMIN,
        keys.RotateKeyRequest,
        schemas.CreatedApiKey,
        more_errors={"409": "The key is revoked"},
    ),
)
