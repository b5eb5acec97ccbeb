"""The OpenAPI 3.1 document, built from the operations each surface declares
(`Operation`: a route, its method, scope and the pydantic models of its
request and answer), and an interactive page for it (`/docs`, Swagger UI
served from the `swagger-ui-py` package, never from a CDN: users' machines
may be offline).

Schemas are generated from the pydantic models the handlers validate
requests with and build answers with, so the document says what is served.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.errors import ErrorEnvelope
from marie_gateway.http.params import MAX_ID_LENGTH

Method = Literal["get", "post", "put", "patch", "delete"]
#: The `scope` of an operation open to any valid key.
ANY_KEY = ""


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    required: bool = False
    type: str = "string"
    # What the handler accepts beyond the type (bounds, lengths, enums), so
    # the document refuses what the gateway refuses.
    schema: dict[str, Any] = field(default_factory=dict)


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
    headers: tuple[Param, ...] = ()
    raw_response: str | None = None  # a non-JSON answer: its media type
    extra: dict[str, Any] = field(default_factory=dict)
    # The status of a success (201 for a creation).
    status: str = "200"
    # Error statuses of this operation beyond the common ones, with their meaning.
    more_errors: dict[str, str] = field(default_factory=dict)
    # Path parameters' schemas beyond a non-empty id of at most MAX_ID_LENGTH.
    path_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A surface with its own error shape (Anthropic's): its schema, and how
    # its event stream is framed, instead of OpenAI's envelope and `data:` lines.
    error: type[BaseModel] | None = None
    events_framing: str | None = None


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


def _schemas(operations: tuple[Operation, ...]) -> tuple[Refs, dict[str, Any]]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorEnvelope, "serialization")
    ]
    for op in operations:
        if op.request is not None:
            models.append((op.request, "validation"))
        for out in (op.response, op.events, op.error):
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
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_ID_LENGTH,
                **op.path_params.get(name, {}),
            },
        }
        for name, _ in _PARAM.findall(op.path)
    ]
    params += [
        {
            "name": p.name,
            "in": "query",
            "required": p.required,
            "description": p.description,
            "schema": {"type": p.type, **p.schema},
        }
        for p in op.query
    ]
    params += [
        {
            "name": p.name,
            "in": "header",
            "required": p.required,
            "description": p.description,
            "schema": {"type": p.type, "maxLength": 128, "pattern": "^[ -~]+$"},
        }
        for p in op.headers
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
        # As OpenAPI 3.1 reads an event stream: the schema of one event.
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {"type": "string"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
                "description": op.events_framing
                or "Server-sent events: `data: <JSON>` lines, each an object of "
                f"the schema {op.events.__name__}, ending with `data: [DONE]`. Comment lines "
                "(`: keep-alive`) may come while a model is slow.",
            },
            "x-event-schema": refs[(op.events, "serialization")],
        }
    if op.raw_response is not None:
        content[op.raw_response] = {"schema": {"type": "string"}}
    described = "Created" if op.status == "201" else "OK"
    responses_: dict[str, Any] = {op.status: {"description": described, "content": content}}
    if op.scope is not None:
        out["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
        out["description"] = (
            f"Needs a key with the `{op.scope}` scope." if op.scope else "Needs any valid key."
        )
        for status, meaning in {**_ERROR_STATUSES, **op.more_errors}.items():
            if op.error is None and status not in op.more_errors:
                responses_[status] = {"$ref": "#/components/responses/Error"}
            else:
                shape = ErrorEnvelope if op.error is None else op.error
                responses_[status] = {
                    "description": meaning,
                    "content": {"application/json": {"schema": refs[(shape, "serialization")]}},
                }
    else:
        out["security"] = []
    out["responses"] = responses_
    return out


def build_document(version: str, operations: Iterable[Operation]) -> dict[str, Any]:
    """The document of `operations`, in their order."""
    ops = tuple(operations)
    refs, defs = _schemas(ops)
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
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
                        "application/json": {"schema": refs[(ErrorEnvelope, "serialization")]}
                    },
                }
            },
        },
    }


# No inline script: the page's one line of set-up is a file of its own, so the
# policy below can forbid every script that is not one of ours.
_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Marie API</title>
<link rel="icon" href="/docs/static/favicon-32x32.png">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>"""
_DOCS_INIT = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n'

#: The documentation page may load and run only what this origin serves, and
#: no one may frame it (clickjacking); Swagger UI's stylesheet draws its icons
#: from data: URLs.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_HEADERS = {
    "content-security-policy": DOCS_CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: The document is data: it runs nothing, loads nothing and is never framed.
DOCUMENT_HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
}


class _DocsStatic(StaticFiles):
    """Swagger UI's files, with the page's headers."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(DOCS_HEADERS)
        return response


def routes(document: dict[str, Any]) -> list[BaseRoute]:
    """`/openapi.json` serving `document`, and `/docs`, the page that shows it."""

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document, headers=DOCUMENT_HEADERS)

    async def docs(request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE, headers=DOCS_HEADERS)

    async def docs_init(request: Request) -> Response:
        return Response(_DOCS_INIT, media_type="text/javascript", headers=DOCS_HEADERS)

    static = resources.files("swagger_ui") / "static"
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/init.js", docs_init, methods=["GET"]),
        Mount("/docs/static", _DocsStatic(directory=str(static)), name="docs-static"),
    ]
