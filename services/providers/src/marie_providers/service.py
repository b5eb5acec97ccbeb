"""The gRPC face of the providers service: a thin servicer and the kit Component that hosts it.

Handlers validate, call the registry or a provider, and return protobuf; the
kit's interceptor turns a raised ServiceError into the status the caller sees.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.errors import ServiceError
from marie_kit.memory import LargeRequests

from marie_providers.base import Provider
from marie_providers.chunks import ChunkMerger
from marie_providers.errors import DOMAIN
from marie_providers.model_access import ModelAccess
from marie_providers.ollama import OllamaProvider
from marie_providers.registry import ModelRegistry
from marie_providers.settings import ProvidersSettings
from marie_providers.validation import (
    check_chat_request,
    check_embeddings_request,
    check_get_model_request,
    check_search_request,
)

log = logging.getLogger("marie.providers")

SERVICE_NAME = "marie.providers.v1.ProviderService"
COMPLETION_ID_BYTES = 12

Context = grpc.aio.ServicerContext[Any, Any]
ProviderFactory = Callable[[ProvidersSettings], Sequence[Provider]]


def build_providers(settings: ProvidersSettings) -> list[Provider]:
    """The providers the settings enable, in configuration order."""
    providers: list[Provider] = []
    if settings.ollama_enabled:
        providers.append(OllamaProvider.from_settings(settings))
    return providers


def new_completion_id() -> str:
    """A fresh completion id in OpenAI's shape: "chatcmpl-" and 96 random bits."""
    return f"chatcmpl-{secrets.token_hex(COMPLETION_ID_BYTES)}"


@asynccontextmanager
async def within_deadline(context: Context) -> AsyncIterator[None]:
    """Stop the work inside when the caller's deadline passes (no deadline: no limit)."""
    remaining = context.time_remaining()
    if remaining is None:
        yield
        return
    try:
        async with asyncio.timeout(max(remaining, 0.0)):
            yield
    except TimeoutError:
        raise ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "UPSTREAM_TIMEOUT",
            "the call's deadline passed before the upstream answered",
            domain=DOMAIN,
        ) from None


def _access(context: Context) -> ModelAccess:
    """The caller's allowed models, from the metadata its key check added."""
    return ModelAccess.from_metadata(context.invocation_metadata())


class ProviderServicer(pb_grpc.ProviderServiceServicer):
    """ProviderService over a ModelRegistry, which the component sets once started."""

    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None
        self._large = LargeRequests()

    def _registry(self) -> ModelRegistry:
        if self.registry is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "NOT_READY",
                "the providers service is not started",
                domain=DOMAIN,
            )
        return self.registry

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: Context
    ) -> pb.ListProvidersResponse:
        registry = self._registry()
        return pb.ListProvidersResponse(providers=[p.to_proto() for p in registry.providers])

    async def GetProviderHealth(
        self, request: pb.GetProviderHealthRequest, context: Context
    ) -> pb.GetProviderHealthResponse:
        registry = self._registry()
        async with within_deadline(context):
            health = await registry.health(request.provider)
        return pb.GetProviderHealthResponse(providers=health)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        registry = self._registry()
        async with within_deadline(context):
            models, errors = await registry.list_models(
                request.provider,
                force_refresh=request.force_refresh,
                capability=request.capability,
                access=_access(context),
            )
        return pb.ListModelsResponse(models=models, provider_errors=errors)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        check_get_model_request(request)
        registry = self._registry()
        async with within_deadline(context):
            model = await registry.get_model(request.model, request.provider, _access(context))
        return pb.GetModelResponse(model=model)

    async def SearchModels(
        self, request: pb.SearchModelsRequest, context: Context
    ) -> pb.SearchModelsResponse:
        limit = check_search_request(request)
        registry = self._registry()
        async with within_deadline(context):
            models = await registry.search(request.query, request.provider, limit, _access(context))
        return pb.SearchModelsResponse(models=models)

    async def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, context: Context
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        check_chat_request(request)
        registry = self._registry()
        # A large request leaves a large heap behind: trimmed after the last one.
        large = self._large.started(request.ByteSize())
        try:
            async with within_deadline(context):
                provider, model_name = await registry.resolve(
                    request.model, request.provider, _access(context)
                )
            completion_id = request.completion_id or new_completion_id()
            # The stream itself is bounded by gRPC: a passed deadline or a client
            # going away cancels this handler, and aclosing then closes the
            # provider's stream, which closes the upstream request.
            chunks = provider.stream_chat(request, model_name, completion_id, int(time.time()))
            async with aclosing(chunks):
                if not request.aggregate:
                    async for chunk in chunks:
                        yield chunk
                    return
                # The caller wants the whole reply: one message where one will do
                # (every chunk is a gRPC message to send and to read).
                merger = ChunkMerger()
                async for chunk in chunks:
                    if (ready := merger.add(chunk)) is not None:
                        yield ready
                if (last := merger.flush()) is not None:
                    yield last
        finally:
            if large:
                self._large.ended()

    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: Context
    ) -> pb.CreateEmbeddingsResponse:
        check_embeddings_request(request)
        registry = self._registry()
        async with within_deadline(context):
            provider, model_name = await registry.resolve(
                request.model, request.provider, _access(context)
            )
            return await provider.embed(request, model_name)


class ProvidersComponent:
    """The providers service as the kit's server bootstrap runs it.

    `providers` builds the providers from the settings; tests pass their own
    to run several providers side by side.
    """

    service_names: Sequence[str] = (SERVICE_NAME,)
    domain: str = DOMAIN

    def __init__(
        self, settings: ProvidersSettings, *, providers: ProviderFactory = build_providers
    ) -> None:
        self.settings = settings
        self._build_providers = providers
        self.servicer = ProviderServicer()

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ProviderServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        providers = list(self._build_providers(self.settings))
        try:
            registry = ModelRegistry(providers, ttl_seconds=self.settings.model_cache_ttl_seconds)
        except BaseException:
            for provider in providers:
                await provider.aclose()
            raise
        self.servicer.registry = registry
        log.info(
            "providers configured",
            extra={"providers": {p.name: p.base_url for p in providers}},
        )

    async def stopping(self) -> None:
        """Nothing to end early: every call here (chat streams included) is real
        work that finishes on its own, so it gets the grace period."""

    async def close(self) -> None:
        registry, self.servicer.registry = self.servicer.registry, None
        if registry is not None:
            await registry.aclose()
