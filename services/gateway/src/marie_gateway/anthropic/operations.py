"""The Anthropic surface's routes as the OpenAPI document shows them. Its
`GET /v1/models` (Anthropic's shape, for callers that send
`anthropic-version`) shares the OpenAI entry's path and method, so the
document describes it in that entry's place in the README only."""

from __future__ import annotations

from marie_gateway.access.keys import SCOPE_CHAT
from marie_gateway.anthropic import schemas
from marie_gateway.anthropic.errors import AnthropicError
from marie_gateway.http.openapi import Operation

_FRAMING = (
    "Server-sent events as Anthropic sends them: `event: <type>` then `data: <JSON>`, "
    "each data an object of the schema StreamEvent; no `[DONE]` line. Comment lines "
    "(`: keep-alive`) may come while a model is slow."
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/messages",
        "post",
        "Create a message (Anthropic's Messages API); SSE events when `stream` is true",
        "Anthropic",
        SCOPE_CHAT,
        schemas.MessagesRequest,
        schemas.Message,
        schemas.StreamEvent,
        error=AnthropicError,
        events_framing=_FRAMING,
    ),
    Operation(
        "/v1/messages/count_tokens",
        "post",
        "Count a prompt's tokens (Anthropic's API); `x-marie-token-count` says how",
        "Anthropic",
        SCOPE_CHAT,
        schemas.CountTokensRequest,
        schemas.TokenCount,
        error=AnthropicError,
    ),
)
