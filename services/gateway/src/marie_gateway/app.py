"""The gateway's HTTP application, assembled: each surface (the OpenAI `/v1`
routes, legacy completions, the Responses API, the memory `/api` routes, the model
API, comparison, health, metrics, the OpenAPI document, Envoy's key check, the
web console) lives in its own module; this one wires them to the shared state,
the error handlers, CORS and the request context."""

from __future__ import annotations

import logging
from importlib.metadata import version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from marie_gateway import console, grpc_authz, health, metrics, openapi
from marie_gateway.admin_api import AdminRoutes
from marie_gateway.compare import CompareRoutes
from marie_gateway.completions_api import CompletionRoutes
from marie_gateway.core import Gateway
from marie_gateway.errors import ApiError
from marie_gateway.limits import RATE_LIMIT_HEADERS
from marie_gateway.memory_api import MemoryRoutes
from marie_gateway.middleware import RequestContext
from marie_gateway.models_api import ModelRoutes
from marie_gateway.openai_api import OpenAIRoutes
from marie_gateway.responses_api import ResponsesRoutes
from marie_gateway.settings import GatewaySettings
from marie_gateway.usage import UsageRoutes
from marie_gateway.web import current_request_id, error_response

log = logging.getLogger("marie.gateway")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, {"connection": "close"} if exc.close else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        return error_response(ApiError(404, message, code="unknown_url"))
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        # HTTP requires the methods the resource does allow.
        return error_response(ApiError(405, message, code="method_not_allowed"), exc.headers)
    return error_response(ApiError(exc.status_code, str(exc.detail)), exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    message = f"The server had an error processing the request (request id {current_request_id()})."
    return error_response(ApiError(500, message, "server_error", "server_error"))


def create_app(settings: GatewaySettings) -> RequestContext:
    """The gateway as one ASGI application; channels open in its lifespan."""
    gw = Gateway(settings)
    routes = [
        *OpenAIRoutes(gw).routes(),
        *CompletionRoutes(gw).routes(),
        *ResponsesRoutes(gw).routes(),
        *MemoryRoutes(gw).routes(),
        *ModelRoutes(gw).routes(),
        *CompareRoutes(gw).routes(),
        *UsageRoutes(gw).routes(),
        *AdminRoutes(gw).routes(),
        *health.routes(gw),
        *metrics.routes(),
        *openapi.routes(version("marie-gateway")),
        *grpc_authz.routes(gw),
        *console.routes(settings.console_dir),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["authorization", "x-api-key", "content-type", "x-request-id"],
                expose_headers=["x-request-id", "retry-after", *RATE_LIMIT_HEADERS],
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
