"""The OpenAPI 3.1 document of the gateway (`/openapi.json`) and an
interactive page for it (`/docs`, Swagger UI served from the `swagger-ui-py`
package, never from a CDN: users' machines may be offline).

Schemas are generated from the pydantic models the handlers validate
requests with (`protocol.py`) and build answers with (`responses.py`); the
operations table below is checked against the routes the app serves by a
test, in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from marie_gateway import admin_api, memory_docs, protocol, responses
from marie_gateway.access import SCOPE_ADMIN, SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS
from marie_gateway.web import JSONResponse

Method = Literal["get", "post", "put", "patch", "delete"]
#: The `scope` of an operation open to any valid key.
ANY_KEY = ""


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    required: bool = False
    type: str = "string"


@dataclass(frozen=True)
class Operation:
    """One documented route and method."""

    path: str  # the Starlette template, e.g. "/v1/models/{model_id:path}"
    method: Method
    summary: str
    tag: str
    scope: str | None  # None: no key needed
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    # Events of a text/event-stream answer (always, or when the body says stream).
    events: type[BaseModel] | None = None
    query: tuple[Param, ...] = ()
    raw_response: str | None = None  # a non-JSON answer: its media type
    extra: dict[str, Any] = field(default_factory=dict)


_REFRESH = Param("refresh", "true forces a refresh of the providers' model lists.", type="boolean")

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/chat/completions",
        "post",
        "Chat completion (OpenAI); SSE when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        protocol.ChatCompletionRequest,
        responses.ChatCompletion,
        responses.ChatCompletionChunk,
    ),
    Operation(
        "/api/v1/chat/completions",
        "post",
        "Chat completion (the developer API's path; same as /v1/chat/completions)",
        "OpenAI",
        SCOPE_CHAT,
        protocol.ChatCompletionRequest,
        responses.ChatCompletion,
        responses.ChatCompletionChunk,
    ),
    Operation(
        "/v1/completions",
        "post",
        "Text completion (OpenAI's legacy API); SSE when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        protocol.CompletionRequest,
        responses.TextCompletion,
        responses.TextCompletion,
    ),
    Operation(
        "/v1/models",
        "get",
        "Models this key may use",
        "OpenAI",
        SCOPE_MODELS,
        None,
        responses.OpenAIModelList,
    ),
    Operation(
        "/v1/models/{model_id:path}",
        "get",
        "One model",
        "OpenAI",
        SCOPE_MODELS,
        None,
        responses.OpenAIModel,
    ),
    Operation(
        "/v1/embeddings",
        "post",
        "Embeddings",
        "OpenAI",
        SCOPE_EMBEDDINGS,
        protocol.EmbeddingsRequest,
        responses.EmbeddingList,
    ),
    Operation(
        "/v1/responses",
        "post",
        "Create a response (OpenAI's Responses API); typed SSE events when `stream` is true",
        "OpenAI",
        SCOPE_CHAT,
        protocol.ResponsesRequest,
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
            Param("limit", "1 to 100, default 20.", type="integer"),
            Param("order", "desc (the default, newest first) or asc."),
            Param("after", "An item id: the page starts after it."),
        ),
    ),
    Operation(
        "/api/models",
        "get",
        "Every model, grouped by provider",
        "Models",
        SCOPE_MODELS,
        response=responses.ModelsByProvider,
        query=(_REFRESH,),
    ),
    Operation(
        "/api/models/search",
        "get",
        "Search models by id, name, description, family and capability",
        "Models",
        SCOPE_MODELS,
        response=responses.ModelSearchResults,
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
        response=responses.ProvidersList,
    ),
    Operation(
        "/api/models/providers/health",
        "get",
        "Health of every provider",
        "Models",
        SCOPE_MODELS,
        response=responses.ProvidersHealth,
    ),
    Operation(
        "/api/models/{provider}",
        "get",
        "One provider's models",
        "Models",
        SCOPE_MODELS,
        response=responses.ProviderModels,
        query=(_REFRESH,),
    ),
    Operation(
        "/api/models/{provider}/{model:path}",
        "get",
        "One model (names may contain '/' and ':')",
        "Models",
        SCOPE_MODELS,
        response=responses.MarieModel,
    ),
    Operation(
        "/api/compare",
        "post",
        "One prompt on several models, streamed side by side",
        "Compare",
        SCOPE_CHAT,
        protocol.CompareRequest,
        events=responses.CompareEvent,
    ),
    *(
        Operation(
            spec["path"],
            spec["method"],
            spec["summary"],
            memory_docs.TAG,
            memory_docs.SCOPE,
            spec.get("request"),
            spec.get("response"),
            spec.get("events"),
            tuple(Param(*q) for q in spec.get("query", ())),
        )
        for spec in memory_docs.OPERATIONS
    ),
    Operation(
        "/api/usage",
        "get",
        "Usage totals: the caller's own key; any key or owner with `admin`",
        "Usage",
        ANY_KEY,
        response=responses.UsageReport,
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
        admin_api.CreateKeyRequest,
        responses.CreatedApiKey,
    ),
    Operation(
        "/api/keys",
        "get",
        "List keys, newest first, page by page",
        "Keys",
        SCOPE_ADMIN,
        response=responses.ApiKeyList,
        query=(
            Param("owner", "Only this owner's keys."),
            Param("include_inactive", "true includes revoked and expired keys.", type="boolean"),
            Param("page_size", "1 to 500, default 50.", type="integer"),
            Param("page_token", "next_page_token of the previous page."),
        ),
    ),
    Operation(
        "/api/keys/{key_id}", "get", "One key", "Keys", SCOPE_ADMIN, response=responses.ApiKeyOut
    ),
    Operation(
        "/api/keys/{key_id}",
        "patch",
        "Change a key's settings (only the fields sent)",
        "Keys",
        SCOPE_ADMIN,
        admin_api.KeySettings,
        responses.ApiKeyOut,
    ),
    Operation(
        "/api/keys/{key_id}",
        "delete",
        "Revoke a key, at once and for good",
        "Keys",
        SCOPE_ADMIN,
        response=responses.ApiKeyOut,
    ),
    Operation(
        "/api/keys/{key_id}/rotate",
        "post",
        "Replace a key's secret (the new plaintext is in this answer only)",
        "Keys",
        SCOPE_ADMIN,
        admin_api.RotateKeyRequest,
        responses.CreatedApiKey,
    ),
    Operation(
        "/healthz", "get", "The process is up", "Operations", None, response=responses.Health
    ),
    Operation(
        "/readyz",
        "get",
        "The services behind are SERVING",
        "Operations",
        None,
        response=responses.Health,
    ),
    Operation(
        "/metrics", "get", "Prometheus metrics", "Operations", None, raw_response="text/plain"
    ),
    Operation(
        "/openapi.json", "get", "This document", "Operations", None, raw_response="application/json"
    ),
    Operation(
        "/docs", "get", "Interactive documentation", "Operations", None, raw_response="text/html"
    ),
    Operation("/", "get", "The web console", "Operations", None, raw_response="text/html"),
)

#: Routes the app serves that are deliberately not in the document.
INTERNAL_PATHS = frozenset(
    {"/_authz/{method:path}", "/docs/static", "/assets/{name:path}", "/favicon.svg"}
)

_PARAM = re.compile(r"{(\w+)(:\w+)?}")
_ERROR_STATUSES = {
    "400": "Invalid request (the field is in `param`)",
    "401": "Missing or invalid API key",
    "403": "The key lacks the scope, or may not use the model",
    "404": "Not found",
    "429": "Rate limited",
    "503": "A service or provider is unavailable",
}


def openapi_path(template: str) -> str:
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)


Refs = dict[tuple[Any, str], Any]


def _schemas() -> tuple[Refs, dict[str, Any]]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (responses.ErrorEnvelope, "serialization")
    ]
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        for out in (op.response, op.events):
            if out is not None:
                models.append((out, "serialization"))
    refs, defs = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    found: dict[str, Any] = defs.get("$defs", {})
    return {(model, mode): schema for (model, mode), schema in refs.items()}, found


def _operation(op: Operation, refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{op.method}_{openapi_path(op.path).strip('/').replace('/', '_')}".replace(
            "{", ""
        )
        .replace("}", "")
        .replace(".", "_"),
    }
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name, _ in _PARAM.findall(op.path)
    ]
    params += [
        {
            "name": p.name,
            "in": "query",
            "required": p.required,
            "description": p.description,
            "schema": {"type": p.type},
        }
        for p in op.query
    ]
    if params:
        out["parameters"] = params
    if op.request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.request, "validation")]}},
        }
    content: dict[str, Any] = {}
    if op.response is not None:
        content["application/json"] = {"schema": refs[(op.response, "serialization")]}
    if op.events is not None:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "Server-sent events: `data: <JSON>` lines, each an object of "
                f"the schema {op.events.__name__}, ending with `data: [DONE]`. Comment lines "
                "(`: keep-alive`) may come while a model is slow.",
            },
            "x-event-schema": refs[(op.events, "serialization")],
        }
    if op.raw_response is not None:
        content[op.raw_response] = {"schema": {"type": "string"}}
    responses_: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    if op.scope is not None:
        out["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
        out["description"] = (
            f"Needs a key with the `{op.scope}` scope." if op.scope else "Needs any valid key."
        )
        for status in _ERROR_STATUSES:
            responses_[status] = {"$ref": "#/components/responses/Error"}
    else:
        out["security"] = []
    out["responses"] = responses_
    return out


def build_document(version: str) -> dict[str, Any]:
    refs, defs = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(openapi_path(op.path), {})[op.method] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Marie gateway",
            "version": version,
            "description": "OpenAI-compatible API (`/v1`) and Marie's own API (`/api`). Every "
            "error is OpenAI's envelope; every answer carries `x-request-id`.",
        },
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API key"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "responses": {
                "Error": {
                    "description": "An error, in OpenAI's envelope",
                    "content": {
                        "application/json": {
                            "schema": refs[(responses.ErrorEnvelope, "serialization")]
                        }
                    },
                }
            },
        },
    }


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Marie API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


def routes(version: str) -> list[BaseRoute]:
    document = build_document(version)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    async def docs(request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE)

    static = resources.files("swagger_ui") / "static"
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Mount("/docs/static", StaticFiles(directory=str(static)), name="docs-static"),
    ]
