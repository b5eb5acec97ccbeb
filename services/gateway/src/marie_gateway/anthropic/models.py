"""`GET /v1/models` and `GET /v1/models/{id}` in Anthropic's shape, for
callers that send `anthropic-version` (Anthropic's SDKs and Claude Code always
do); without that header the OpenAI routes (`openai/models.py`) answer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from marie_gateway.access.keys import SCOPE_MODELS, Principal
from marie_gateway.anthropic.errors import REQUEST_ID_HEADER, VERSION_HEADER
from marie_gateway.anthropic.limits import add_anthropic_headers
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import ApiError, bad_request, from_rpc_error

#: Anthropic's page size of a model list: by default, and at most.
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
_VERSION = VERSION_HEADER.encode()
_EPOCH = "1970-01-01T00:00:00Z"


class AnthropicRoute(Route):
    """A route that matches only requests carrying `anthropic-version`, so the
    same path answers other callers through the routes after it."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and not any(k == _VERSION for k, _ in scope["headers"]):
            return Match.NONE, {}
        return super().matches(scope)


class AnthropicModelRoutes:
    """Handlers of `/v1/models…` for Anthropic's clients."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            AnthropicRoute("/v1/models", self.list_models, methods=["GET"]),
            AnthropicRoute("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
        ]

    async def _enter(self, request: Request) -> Principal:
        try:
            return await self.gw.enter(request, SCOPE_MODELS)
        finally:
            add_anthropic_headers(request.scope)

    async def list_models(self, request: Request) -> Response:
        gw = self.gw
        principal = await self._enter(request)
        params = request.query_params
        raw_limit = params.get("limit", str(DEFAULT_LIMIT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise bad_request(f"limit: a whole number from 1 to {MAX_LIMIT}", "limit")
        try:
            reply = await gw.backends().providers.ListModels(
                pb.ListModelsRequest(),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        models = [model_object(m) for m in reply.models]
        ids = [m["id"] for m in models]
        after, before = params.get("after_id"), params.get("before_id")
        if after and before:
            raise bad_request("after_id and before_id cannot both be given", "after_id")
        for name, cursor in (("after_id", after), ("before_id", before)):
            if cursor and cursor not in ids:
                raise ApiError(404, f"{name}: no model '{cursor}'", "not_found_error")
        limit = int(raw_limit)
        if after:
            rest = models[ids.index(after) + 1 :]
            page, has_more = rest[:limit], len(rest) > limit
        elif before:
            rest = models[: ids.index(before)]
            page, has_more = rest[-limit:], len(rest) > limit
        else:
            page, has_more = models[:limit], len(models) > limit
        return JSONResponse(
            {
                "data": page,
                "has_more": has_more,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            },
            headers={REQUEST_ID_HEADER: current_request_id()},
        )

    async def get_model(self, request: Request) -> Response:
        gw = self.gw
        principal = await self._enter(request)
        try:
            reply = await gw.backends().providers.GetModel(
                pb.GetModelRequest(model=request.path_params["model_id"]),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        return JSONResponse(
            model_object(reply.model), headers={REQUEST_ID_HEADER: current_request_id()}
        )


def model_object(model: pb.ModelInfo) -> dict[str, Any]:
    """One model as Anthropic lists it; an alias or split shows as itself."""
    created = _EPOCH
    if model.HasField("modified_time") and model.modified_time.seconds:
        when = datetime.fromtimestamp(model.modified_time.seconds, UTC)
        created = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": "model",
        "id": model.id,
        "display_name": model.name or model.id,
        "created_at": created,
    }
