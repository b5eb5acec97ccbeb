"""The OpenAI surface's routes as the OpenAPI document shows them: one entry
per route and method."""

from __future__ import annotations

from marie_gateway.access.keys import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS
from marie_gateway.http.openapi import Operation, Param
from marie_gateway.http.params import MAX_ID_LENGTH, MAX_MODEL_LENGTH
from marie_gateway.openai import schemas
from marie_gateway.openai.responses import schemas as responses

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/chat/completions",
        "post",
        "Chat completion (OpenAI); SSE when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        schemas.ChatCompletionRequest,
        schemas.ChatCompletion,
        schemas.ChatCompletionChunk,
    ),
    Operation(
        "/api/v1/chat/completions",
        "post",
        "Chat completion (the developer API's path; same as /v1/chat/completions)",
        "OpenAI",
        SCOPE_CHAT,
        schemas.ChatCompletionRequest,
        schemas.ChatCompletion,
        schemas.ChatCompletionChunk,
    ),
    Operation(
        "/v1/completions",
        "post",
        "Text completion (OpenAI's legacy API); SSE when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        schemas.CompletionRequest,
        schemas.TextCompletion,
        schemas.TextCompletion,
    ),
    Operation(
        "/v1/models",
        "get",
        "Models this key may use",
        "OpenAI",
        SCOPE_MODELS,
        None,
        schemas.OpenAIModelList,
    ),
    Operation(
        "/v1/models/{model_id:path}",
        "get",
        "One model",
        "OpenAI",
        SCOPE_MODELS,
        None,
        schemas.OpenAIModel,
        path_params={"model_id": {"maxLength": MAX_MODEL_LENGTH}},
    ),
    Operation(
        "/v1/embeddings",
        "post",
        "Embeddings",
        "OpenAI",
        SCOPE_EMBEDDINGS,
        schemas.EmbeddingsRequest,
        schemas.EmbeddingList,
    ),
    Operation(
        "/v1/responses",
        "post",
        "Create a response (OpenAI's Responses API); typed SSE events when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        responses.ResponsesRequest,
        responses.ResponseObject,
        responses.ResponseStreamEvent,
    ),
    Operation(
        "/v1/responses/{response_id}",
        "get",
        "A stored response (this key's tenant only)",
        "OpenAI",
        SCOPE_CHAT,
        None,
        responses.ResponseObject,
    ),
    Operation(
        "/v1/responses/{response_id}",
        "delete",
        "Delete a stored response",
        "OpenAI",
        SCOPE_CHAT,
        None,
        responses.ResponseDeleted,
    ),
    Operation(
        "/v1/responses/{response_id}/input_items",
        "get",
        "The input items of a stored response, a page at a time",
        "OpenAI",
        SCOPE_CHAT,
        None,
        responses.InputItemList,
        query=(
            Param(
                "limit",
                "1 to 100, default 20.",
                type="integer",
                schema={"minimum": 1, "maximum": 100},
            ),
            Param(
                "order",
                "desc (the default, newest first) or asc.",
                schema={"enum": ["asc", "desc"]},
            ),
            Param(
                "after",
                "An item id of this response: the page starts after it.",
                schema={"maxLength": MAX_ID_LENGTH},
            ),
        ),
    ),
)
