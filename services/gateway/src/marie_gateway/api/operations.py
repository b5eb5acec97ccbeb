"""Marie's own `/api` routes as the OpenAPI document shows them: one entry per
route and method."""

from __future__ import annotations

from typing import Any

from marie_gateway.access.keys import SCOPE_ADMIN, SCOPE_CHAT, SCOPE_MEMORY, SCOPE_MODELS
from marie_gateway.api import conversations, keys, memories, schemas
from marie_gateway.http.openapi import ANY_KEY, Operation, Param
from marie_gateway.openai.schemas import ChatCompletionChunk

_REFRESH = Param("refresh", "true forces a refresh of the providers' model lists.", type="boolean")

Query = tuple[str, str, bool, str]  # name, description, required, type
_USER: Query = (
    "user",
    "The end user within the key's tenant (default: the tenant).",
    False,
    "string",
)
_TENANT: Query = ("tenant", "Another tenant (keys with the admin scope only).", False, "string")
_PAGE: tuple[Query, ...] = (
    ("limit", "Page size.", False, "integer"),
    ("page_token", "From the previous page's next_page_token.", False, "string"),
)
_WHO = (_USER, _TENANT)
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
        "headers": _IDEMPOTENT,
    },
    {
        "path": _C,
        "method": "get",
        "summary": "The user's conversations, newest first",
        "response": schemas.ConversationList,
        "query": (*_WHO, *_PAGE, ("order", "created (default) or updated.", False, "string")),
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
        "query": (*_WHO, *_PAGE, ("order", "asc (default) or desc.", False, "string")),
    },
    {
        "path": _C + "/{id}/messages",
        "method": "post",
        "summary": "Send a message: the answer streams (SSE), both turns are stored after it",
        "request": conversations.TurnCreate,
        "response": schemas.MessageOut,
        "events": ChatCompletionChunk,
        "headers": _IDEMPOTENT,
    },
    {
        "path": "/api/search",
        "method": "get",
        "summary": "Search the user's messages",
        "response": schemas.MessageSearchResults,
        "query": (
            ("q", "What to look for.", True, "string"),
            *_WHO,
            *_PAGE,
            ("conversation_id", "Only this conversation.", False, "string"),
            ("role", "Only this role (repeatable).", False, "string"),
            ("mode", "hybrid, vector or keyword.", False, "string"),
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
            ("category", "Only these categories (repeatable).", False, "string"),
            ("conversation_id", "Only memories from this conversation.", False, "string"),
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
            ("q", "What to look for.", True, "string"),
            *_WHO,
            ("top_k", "At most this many (default 10).", False, "integer"),
            ("threshold", "Minimum score, 0 to 1.", False, "number"),
            ("mode", "hybrid, vector or keyword.", False, "string"),
            ("category", "Only these categories (repeatable).", False, "string"),
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
        "query": (*_WHO, ("erase_history", "true also erases its history.", False, "boolean")),
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
            Param("q", "Words that must all match.", required=True),
            Param("provider", "Only this provider's models."),
            Param("capability", "chat, completion, embeddings, tools or vision."),
            Param("limit", "At most this many (1-200, default 50).", type="integer"),
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
    ),
    Operation(
        "/api/models/{provider}/{model:path}",
        "get",
        "One model (names may contain '/' and ':')",
        "Models",
        SCOPE_MODELS,
        response=schemas.MarieModel,
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
            tuple(Param(*q) for q in spec.get("query", ())),
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
            ),
            Param("to", "End, exclusive; default now."),
            Param("group_by", "day, model or key; none: only the totals."),
            Param("key_id", "Only this key (admin, or the caller's own)."),
            Param("owner", "Only this owner's keys (admin)."),
        ),
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
            Param("owner", "Only this owner's keys."),
            Param("include_inactive", "true includes revoked and expired keys.", type="boolean"),
            Param("page_size", "1 to 500, default 50.", type="integer"),
            Param("page_token", "next_page_token of the previous page."),
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
        keys.KeySettings,
        schemas.ApiKeyOut,
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
    ),
)
