"""The OpenAPI 3.1 document of the gateway (`/openapi.json`) and its page
(`/docs`): every surface's operations, in one table that a test checks
against the routes the app serves, in both directions."""

from __future__ import annotations

from starlette.routing import BaseRoute

from marie_gateway.anthropic.operations import OPERATIONS as ANTHROPIC_OPERATIONS
from marie_gateway.api.operations import OPERATIONS as API_OPERATIONS
from marie_gateway.http import openapi
from marie_gateway.http.openapi import Operation
from marie_gateway.openai.operations import OPERATIONS as OPENAI_OPERATIONS
from marie_gateway.ops.health import Health

#: The routes operators and the console use.
OPS_OPERATIONS: tuple[Operation, ...] = (
    Operation("/healthz", "get", "The process is up", "Operations", None, response=Health),
    Operation(
        "/readyz",
        "get",
        "The services behind are SERVING",
        "Operations",
        None,
        response=Health,
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

#: Every documented route and method, in the document's order.
OPERATIONS: tuple[Operation, ...] = (
    *OPENAI_OPERATIONS,
    *ANTHROPIC_OPERATIONS,
    *API_OPERATIONS,
    *OPS_OPERATIONS,
)

#: Routes the app serves that are deliberately not in the document.
INTERNAL_PATHS = frozenset(
    {
        "/_authz/{method:path}",
        "/docs/static",
        "/docs/init.js",
        "/assets/{name:path}",
        "/favicon.svg",
    }
)


def routes(version: str) -> list[BaseRoute]:
    return openapi.routes(openapi.build_document(version, OPERATIONS))
