"""The gateway's HTTP application, assembled: each surface (`openai/`: the
OpenAI `/v1` routes; `anthropic/`: Anthropic's `/v1/messages`; `api/`:
Marie's own `/api`; `console/`; `ops/`: health,
the OpenAPI document, Envoy's key check; and `/metrics`) lives in its own
package; this module wires them to the shared state (`core.Gateway`), the
error handlers, CORS and the request context."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from importlib.metadata import version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.limits import RATE_LIMIT_HEADERS
from marie_gateway.access.tally import Tally
from marie_gateway.anthropic import errors as anthropic_errors
from marie_gateway.anthropic.messages import MessagesRoutes
from marie_gateway.anthropic.models import AnthropicModelRoutes
from marie_gateway.api.budgets import BudgetRoutes
from marie_gateway.api.compare import CompareRoutes
from marie_gateway.api.conversations import ConversationRoutes
from marie_gateway.api.keys import KeyRoutes
from marie_gateway.api.memories import MemoryRoutes
from marie_gateway.api.models import ModelRoutes
from marie_gateway.api.usage import UsageRoutes
from marie_gateway.console import routes as console
from marie_gateway.core import TALLY_KEY, Gateway
from marie_gateway.http import metrics
from marie_gateway.http.context import RequestContext, current_request_id
from marie_gateway.http.errors import ApiError, error_response
from marie_gateway.openai.chat import ChatRoutes
from marie_gateway.openai.completions import CompletionRoutes
from marie_gateway.openai.embeddings import EmbeddingRoutes
from marie_gateway.openai.models import OpenAIModelRoutes
from marie_gateway.openai.responses.routes import ResponsesRoutes
from marie_gateway.ops import docs, grpc_authz, health
from marie_gateway.settings import GatewaySettings

log = logging.getLogger("marie.gateway")


def _answer(
    request: Request, error: ApiError, headers: Mapping[str, str] | None = None
) -> Response:
    """An error in the shape of the surface asked: Anthropic's or OpenAI's."""
    if anthropic_errors.is_anthropic(request):
        return anthropic_errors.error_response(error, headers)
    return error_response(error, headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    tally: Tally | None = request.scope.get(TALLY_KEY)
    if tally is not None and not exc.upstream:
        tally.refused(exc.status)
    return _answer(request, exc, {"connection": "close"} if exc.close else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        return _answer(request, ApiError(404, message, code="unknown_url"))
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        # HTTP requires the methods the resource does allow: those of every
        # route of this path, not only of the first one Starlette tried.
        allow = {"allow": ", ".join(_allowed_methods(request))}
        return _answer(request, ApiError(405, message, code="method_not_allowed"), allow)
    return _answer(request, ApiError(exc.status_code, str(exc.detail)), exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the resource at this path: those of every route matching it."""
    path = request.url.path
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


def _literal_paths_first(routes: list[BaseRoute]) -> None:
    """A path some route names as it is (`/api/memories/search`) is that
    resource alone: routes with a parameter (`/api/memories/{id}`) stop
    matching it, so `PATCH /api/memories/search` is a 405 naming GET, not a
    lookup of the memory called "search"."""
    literal = {r.path for r in routes if isinstance(r, Route) and not r.param_convertors}
    for route in routes:
        if not isinstance(route, Route) or not route.param_convertors:
            continue
        shadowed = sorted(p for p in literal if route.path_regex.match(p))
        if shadowed:
            excluded = "|".join(re.escape(p) for p in shadowed)
            pattern = route.path_regex.pattern.removeprefix("^")
            route.path_regex = re.compile(f"^(?!(?:{excluded})$){pattern}")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    message = f"The server had an error processing the request (request id {current_request_id()})."
    return _answer(request, ApiError(500, message, "server_error", "server_error"))


def create_app(settings: GatewaySettings) -> RequestContext[Gateway]:
    """The gateway as one ASGI application; channels open in its lifespan."""
    gw = Gateway(settings)
    routes = [
        *ChatRoutes(gw).routes(),
        *MessagesRoutes(gw).routes(),
        # Before the OpenAI ones: they answer only callers sending anthropic-version.
        *AnthropicModelRoutes(gw).routes(),
        *OpenAIModelRoutes(gw).routes(),
        *EmbeddingRoutes(gw).routes(),
        *CompletionRoutes(gw).routes(),
        *ResponsesRoutes(gw).routes(),
        *ConversationRoutes(gw).routes(),
        *MemoryRoutes(gw).routes(),
        *ModelRoutes(gw).routes(),
        *CompareRoutes(gw).routes(),
        *UsageRoutes(gw).routes(),
        *KeyRoutes(gw).routes(),
        *BudgetRoutes(gw).routes(),
        *health.routes(gw),
        *metrics.routes(),
        *docs.routes(version("marie-gateway")),
        *grpc_authz.routes(gw),
        *console.routes(settings.console_dir),
    ]
    _literal_paths_first(routes)
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=[
                    "authorization",
                    "x-api-key",
                    "content-type",
                    "x-request-id",
                    "anthropic-version",
                    "anthropic-beta",
                ],
                expose_headers=[
                    "x-request-id",
                    "retry-after",
                    *RATE_LIMIT_HEADERS,
                    *anthropic_errors.EXPOSED_HEADERS,
                ],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=gw.lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    return RequestContext(app, gw)
