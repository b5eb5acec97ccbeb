"""`GET /v1/models` and `GET /v1/models/{id}`: the models a key may use, in
OpenAI's shape, over the providers service's catalogue (scope `models:read`)."""

from __future__ import annotations

from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_MODELS
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import from_rpc_error
from marie_gateway.http.params import MAX_MODEL_LENGTH, path_text


class OpenAIModelRoutes:
    """Handlers of `/v1/models…`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
        ]

    async def list_models(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.enter(request, SCOPE_MODELS)
        try:
            reply = await gw.backends().providers.ListModels(
                pb.ListModelsRequest(),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        return JSONResponse({"object": "list", "data": [_model_object(m) for m in reply.models]})

    async def get_model(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.enter(request, SCOPE_MODELS)
        model_id = path_text(request, "model_id", MAX_MODEL_LENGTH)
        try:
            reply = await gw.backends().providers.GetModel(
                pb.GetModelRequest(model=model_id),
                timeout=gw.settings.control_timeout_seconds,
                metadata=principal.call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None
        return JSONResponse(_model_object(reply.model))


def _model_object(model: pb.ModelInfo) -> dict[str, Any]:
    created = model.modified_time.seconds if model.HasField("modified_time") else 0
    if model.HasField("route"):
        # An alias or split of the providers' configuration: what it routes to.
        targets = [t.model for t in model.route.targets]
        return {
            "id": model.id,
            "object": "model",
            "created": 0,
            "owned_by": "marie",
            "routes_to": targets,
        }
    return {"id": model.id, "object": "model", "created": created, "owned_by": model.provider}
