"""Marie's own model API, in the original design's shapes: `/api/models…`
(catalogue by provider, one model, search, providers and their health), over
the providers service's RPCs. Scope `models:read`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_MODELS, Principal
from marie_gateway.api.schemas import (
    Capability,
    CircuitState,
    DeploymentState,
    MarieModel,
    ModelsByProvider,
    ModelSearchResults,
    Operation,
    ProviderHealthInfo,
    ProviderListingError,
    ProviderModels,
    ProvidersHealth,
    ProvidersList,
    ProviderSummary,
)
from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import bad_request, from_rpc_error
from marie_gateway.http.params import MAX_MODEL_LENGTH, int_query, path_text, text_query

T = TypeVar("T")

CAPABILITIES: dict[int, Capability] = {
    pb.MODEL_CAPABILITY_CHAT: "chat",
    pb.MODEL_CAPABILITY_COMPLETION: "completion",
    pb.MODEL_CAPABILITY_EMBEDDINGS: "embeddings",
    pb.MODEL_CAPABILITY_TOOLS: "tools",
    pb.MODEL_CAPABILITY_VISION: "vision",
}
CAPABILITY_BY_NAME = {name: value for value, name in CAPABILITIES.items()}
HEALTH = {
    pb.HEALTH_STATUS_HEALTHY: "healthy",
    pb.HEALTH_STATUS_DEGRADED: "degraded",
    pb.HEALTH_STATUS_UNHEALTHY: "unhealthy",
    pb.HEALTH_STATUS_ERROR: "error",
}
CIRCUITS: dict[int, CircuitState] = {
    pb.CIRCUIT_STATE_CLOSED: "closed",
    pb.CIRCUIT_STATE_OPEN: "open",
    pb.CIRCUIT_STATE_HALF_OPEN: "half_open",
}
OPERATIONS: dict[int, Operation] = {
    pb.OPERATION_CHAT: "chat",
    pb.OPERATION_COMPLETIONS: "completions",
    pb.OPERATION_EMBEDDINGS: "embeddings",
}
# What a search answers unless `limit` says otherwise (and the most it may say).
DEFAULT_SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 200
#: Provider names are configuration keys of at most 64 characters.
MAX_PROVIDER_LENGTH = 64


def marie_model(m: pb.ModelInfo) -> MarieModel:
    metadata: dict[str, object] = dict(m.metadata)
    if m.family:
        metadata["family"] = m.family
    if m.format:
        metadata["format"] = m.format
    if m.HasField("modified_time"):
        metadata["modified_at"] = m.modified_time.ToJsonString()
    return MarieModel(
        id=m.name,
        name=m.name,
        provider=m.provider,
        full_id=m.id,
        description=m.description or None,
        parameters=m.parameters or None,
        quantization=m.quantization or None,
        size=m.size_label or None,
        size_bytes=m.size_bytes or None,
        context_length=m.context_length or None,
        max_tokens=m.max_tokens or None,
        capabilities=[CAPABILITIES[c] for c in m.capabilities if c in CAPABILITIES],
        metadata=metadata,
    )


def _json(model: BaseModel) -> Response:
    return JSONResponse(model.model_dump(mode="json"))


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise bad_request(f"'{name}' must be true or false.", name)
    return value in ("true", "1")


class ModelRoutes:
    """Handlers of `/api/models…`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        # Fixed paths before `{provider}`: a provider named "search" or
        # "providers" cannot be listed by name here (use ?provider= on search).
        return [
            Route("/api/models", self.all_models, methods=["GET"]),
            Route("/api/models/search", self.search, methods=["GET"]),
            Route("/api/models/providers", self.providers, methods=["GET"]),
            Route("/api/models/providers/health", self.health, methods=["GET"]),
            Route("/api/models/{provider}", self.provider_models, methods=["GET"]),
            Route("/api/models/{provider}/{model:path}", self.one_model, methods=["GET"]),
        ]

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, current_request_id()) from None

    @property
    def _timeout(self) -> float:
        return self.gw.settings.control_timeout_seconds

    async def all_models(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        reply = await self._call(
            self.gw.backends().providers.ListModels(
                pb.ListModelsRequest(force_refresh=_flag(request, "refresh")),
                timeout=self._timeout,
                metadata=principal.call_metadata(),
            )
        )
        # Aliases and splits belong to no provider: they are in /v1/models.
        listed = [m for m in reply.models if not m.HasField("route")]
        by_provider: dict[str, list[MarieModel]] = {}
        for m in listed:
            by_provider.setdefault(m.provider, []).append(marie_model(m))
        errors = [
            ProviderListingError(provider=e.provider, reason=e.reason, message=e.message)
            for e in reply.provider_errors
        ]
        return _json(ModelsByProvider(models=by_provider, total=len(listed), errors=errors))

    async def provider_models(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        provider = path_text(request, "provider", MAX_PROVIDER_LENGTH)
        reply = await self._call(
            self.gw.backends().providers.ListModels(
                pb.ListModelsRequest(provider=provider, force_refresh=_flag(request, "refresh")),
                timeout=self._timeout,
                metadata=principal.call_metadata(),
            )
        )
        models = [marie_model(m) for m in reply.models]
        return _json(ProviderModels(provider=provider, models=models, total=len(models)))

    async def one_model(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        reply = await self._call(
            self.gw.backends().providers.GetModel(
                pb.GetModelRequest(
                    provider=path_text(request, "provider", MAX_PROVIDER_LENGTH),
                    model=path_text(request, "model", MAX_MODEL_LENGTH),
                ),
                timeout=self._timeout,
                metadata=principal.call_metadata(),
            )
        )
        return _json(marie_model(reply.model))

    async def search(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        params = request.query_params
        query = text_query(request, "q", MAX_MODEL_LENGTH).strip()
        if not query:
            raise bad_request("Search needs a query: ?q=…", "q")
        capability = params.get("capability", "")
        if capability and capability not in CAPABILITY_BY_NAME:
            names = ", ".join(CAPABILITY_BY_NAME)
            raise bad_request(f"Unknown capability '{capability}'; one of: {names}.", "capability")
        limit = int_query(
            request, "limit", default=DEFAULT_SEARCH_LIMIT, minimum=1, maximum=MAX_SEARCH_LIMIT
        )
        provider = text_query(request, "provider", MAX_PROVIDER_LENGTH)
        reply = await self._call(
            self.gw.backends().providers.SearchModels(
                pb.SearchModelsRequest(query=query, provider=provider, limit=limit),
                timeout=self._timeout,
                metadata=principal.call_metadata(),
            )
        )
        found = list(reply.models)
        if capability:
            wanted = CAPABILITY_BY_NAME[capability]
            found = [m for m in found if wanted in m.capabilities]
        models = [marie_model(m) for m in found]
        return _json(ModelSearchResults(query=query, models=models, total=len(models)))

    async def _providers_and_health(
        self, principal: Principal
    ) -> tuple[pb.ListProvidersResponse, pb.GetProviderHealthResponse]:
        stub = self.gw.backends().providers
        metadata = principal.call_metadata()
        listed, health = await asyncio.gather(
            self._call(
                stub.ListProviders(
                    pb.ListProvidersRequest(), timeout=self._timeout, metadata=metadata
                )
            ),
            self._call(
                stub.GetProviderHealth(
                    pb.GetProviderHealthRequest(), timeout=self._timeout, metadata=metadata
                )
            ),
        )
        return listed, health

    async def providers(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        listed, health = await self._providers_and_health(principal)
        by_name = {h.provider: h for h in health.providers}
        summaries = []
        for p in listed.providers:
            h = by_name.get(p.name)
            summaries.append(
                ProviderSummary(
                    name=p.name,
                    type=p.kind,
                    available=bool(h and h.available),
                    supports_streaming=p.supports_streaming,
                    supports_embeddings=p.supports_embeddings,
                    default_model=p.default_model or None,
                    models_count=h.models_count if h else 0,
                )
            )
        return _json(ProvidersList(providers=summaries))

    async def health(self, request: Request) -> Response:
        principal = await self.gw.enter(request, SCOPE_MODELS)
        listed, health = await self._providers_and_health(principal)
        configured = {p.name: p for p in listed.providers}
        out: dict[str, ProviderHealthInfo] = {}
        for h in health.providers:
            p = configured.get(h.provider)
            out[h.provider] = ProviderHealthInfo(
                status=HEALTH.get(h.status, "unknown"),  # type: ignore[arg-type]
                available=h.available,
                models_count=h.models_count,
                supports_streaming=h.supports_streaming,
                supports_embeddings=h.supports_embeddings,
                default_model=(h.default_model or (p.default_model if p else "")) or None,
                latency_ms=round(h.latency_ms, 3) if h.latency_ms else None,
                error=h.error or None,
                deployments=[deployment_state(d) for d in h.deployments],
            )
        return _json(ProvidersHealth(out))


def deployment_state(d: pb.DeploymentHealth) -> DeploymentState:
    return DeploymentState(
        model=d.model,
        operation=OPERATIONS.get(d.operation, "unknown"),
        circuit=CIRCUITS.get(d.circuit, "unknown"),
        retry_at=d.retry_time.ToJsonString() if d.HasField("retry_time") else None,
        consecutive_failures=d.consecutive_failures,
        in_flight=d.in_flight,
        max_concurrency=d.max_concurrency,
        background_in_flight=d.background_in_flight,
        max_background_concurrency=d.max_background_concurrency,
    )
