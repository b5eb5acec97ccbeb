"""The memory routes (`memory_api.py`) as the OpenAPI document shows them: the
shapes of their answers, and one entry per route and method (`openapi.py`
turns them into operations)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from marie_gateway import memory_api, responses
from marie_gateway.access import SCOPE_MEMORY


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ConversationOut(_Out):
    id: str
    object: Literal["conversation"]
    title: str
    provider: str
    model: str
    message_count: int
    metadata: dict[str, str]
    created_at: int
    updated_at: int


class ConversationList(_Out):
    object: Literal["list"]
    data: list[ConversationOut]
    next_page_token: str


class ConversationDeleted(_Out):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool
    deleted_messages: int


class ToolCallOut(_Out):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class MessageOut(_Out):
    id: str
    object: Literal["conversation.message"]
    conversation_id: str
    position: int
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    #: `latency_ms`, `finish_reason`, `request_id`; `partial` = "true" for an
    #: answer cut short by the client leaving.
    metadata: dict[str, str]
    created_at: int
    name: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None


class MessageList(_Out):
    object: Literal["list"]
    data: list[MessageOut]
    next_page_token: str


class MessageHitOut(MessageOut):
    conversation_title: str
    score: float
    #: The best fragment, `<mark>`-highlighted and otherwise HTML-escaped.
    snippet: str
    snippets: list[str]


class MessageSearchResults(_Out):
    object: Literal["list"]
    data: list[MessageHitOut]
    next_page_token: str
    mode: Literal["hybrid", "vector", "keyword"]
    mode_note: str


class MemoryOut(_Out):
    id: str
    object: Literal["memory"]
    text: str
    categories: list[str]
    metadata: dict[str, str]
    source_conversation_id: str
    source_message_ids: list[str]
    hash: str
    created_at: int
    updated_at: int


class MemoryList(_Out):
    object: Literal["list"]
    data: list[MemoryOut]
    next_page_token: str


class MemoryChangeOut(MemoryOut):
    event: Literal["ADD", "UPDATE", "DELETE", "NONE"]
    previous_text: str


class MemoriesAdded(_Out):
    object: Literal["list"]
    data: list[MemoryChangeOut]
    extraction_model: str
    #: Set when `background` queued the extraction instead of running it.
    job_id: str


class ScoredMemoryOut(MemoryOut):
    score: float


class MemorySearchResults(_Out):
    object: Literal["list"]
    data: list[ScoredMemoryOut]
    mode: Literal["hybrid", "vector", "keyword"]
    mode_note: str


class MemoryDeleted(_Out):
    id: str
    object: Literal["memory.deleted"]
    deleted: bool


class MemoriesErased(_Out):
    object: Literal["memory.deleted"]
    deleted: int


class HistoryEntryOut(_Out):
    id: str
    memory_id: str
    event: Literal["ADD", "UPDATE", "DELETE"]
    old_text: str
    new_text: str
    actor: str
    inferred: bool
    created_at: int


class HistoryList(_Out):
    object: Literal["list"]
    data: list[HistoryEntryOut]
    next_page_token: str


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
_C = "/api/conversations"
_M = "/api/memories"

#: Keyword arguments of `openapi.Operation` (its `query` as tuples), one per route.
OPERATIONS: tuple[dict[str, Any], ...] = (
    {
        "path": _C,
        "method": "post",
        "summary": "Create a conversation",
        "request": memory_api.ConversationCreate,
        "response": ConversationOut,
    },
    {
        "path": _C,
        "method": "get",
        "summary": "The user's conversations, newest first",
        "response": ConversationList,
        "query": (*_WHO, *_PAGE, ("order", "created (default) or updated.", False, "string")),
    },
    {
        "path": _C + "/{id}",
        "method": "get",
        "summary": "One conversation",
        "response": ConversationOut,
        "query": _WHO,
    },
    {
        "path": _C + "/{id}",
        "method": "patch",
        "summary": "Change title, model, provider, metadata",
        "request": memory_api.ConversationPatch,
        "response": ConversationOut,
    },
    {
        "path": _C + "/{id}",
        "method": "delete",
        "summary": "Delete a conversation and its messages",
        "response": ConversationDeleted,
        "query": _WHO,
    },
    {
        "path": _C + "/{id}/messages",
        "method": "get",
        "summary": "A conversation's messages",
        "response": MessageList,
        "query": (*_WHO, *_PAGE, ("order", "asc (default) or desc.", False, "string")),
    },
    {
        "path": _C + "/{id}/messages",
        "method": "post",
        "summary": "Send a message: the answer streams (SSE), both turns are stored after it",
        "request": memory_api.TurnCreate,
        "response": MessageOut,
        "events": responses.ChatCompletionChunk,
    },
    {
        "path": "/api/search",
        "method": "get",
        "summary": "Search the user's messages",
        "response": MessageSearchResults,
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
        "request": memory_api.MemoriesCreate,
        "response": MemoriesAdded,
    },
    {
        "path": _M,
        "method": "get",
        "summary": "The user's memories, newest first",
        "response": MemoryList,
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
        "response": MemoriesErased,
        "query": _WHO,
    },
    {
        "path": _M + "/search",
        "method": "get",
        "summary": "Search the user's memories",
        "response": MemorySearchResults,
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
        "path": _M + "/{id}",
        "method": "get",
        "summary": "One memory",
        "response": MemoryOut,
        "query": _WHO,
    },
    {
        "path": _M + "/{id}",
        "method": "patch",
        "summary": "Change text, categories, metadata",
        "request": memory_api.MemoryPatch,
        "response": MemoryOut,
    },
    {
        "path": _M + "/{id}",
        "method": "delete",
        "summary": "Delete one memory",
        "response": MemoryDeleted,
        "query": (*_WHO, ("erase_history", "true also erases its history.", False, "boolean")),
    },
    {
        "path": _M + "/{id}/history",
        "method": "get",
        "summary": "Every change of a memory",
        "response": HistoryList,
        "query": (*_WHO, *_PAGE),
    },
)
SCOPE = SCOPE_MEMORY
TAG = "Memory"
