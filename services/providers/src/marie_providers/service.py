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
from dataclasses import dataclass
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.acceptance import accepted_metadata
from marie_kit.errors import ServiceError
from marie_kit.lanes import is_background
from marie_kit.memory import LargeRequests
from marie_kit.metering import MeteringBackends, MeteringInterceptor

from marie_providers import kinds
from marie_providers.cache import responses as cache
from marie_providers.cache.keys import Use, cache_key, check_policy
from marie_providers.cache.opensearch_store import OpenSearchCacheStore
from marie_providers.cache.responses import ResponseCache
from marie_providers.cache.sqlite_store import SQLiteCacheStore
from marie_providers.config import MarieConfig, config_from_environment, load_config_file
from marie_providers.errors import DOMAIN, as_asked, bad_request, model_not_found
from marie_providers.metering import METERED
from marie_providers.routing.health import HealthMonitor
from marie_providers.routing.model_access import ModelAccess
from marie_providers.routing.registry import ModelRegistry
from marie_providers.routing.router import Router
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.chunks import ChunkMerger
from marie_providers.upstream.provider import Provider
from marie_providers.validation import (
    check_chat_request,
    check_completion_request,
    check_embeddings_request,
    check_get_model_request,
    check_search_request,
)

log = logging.getLogger("marie.providers")

SERVICE_NAME = "marie.providers.v1.ProviderService"
COMPLETION_ID_BYTES = 12

Context = grpc.aio.ServicerContext[Any, Any]
ProviderFactory = Callable[[ProvidersSettings], Sequence[Provider]]
# A health round at start waits this much longer than one probe may take.
FIRST_HEALTH_SLACK_SECONDS = 1.0


def load_config(settings: ProvidersSettings) -> MarieConfig:
    """The file `MARIE_CONFIG` names, or the environment shortcuts; ConfigError when bad."""
    if settings.config is not None:
        return load_config_file(settings.config)
    return config_from_environment(
        ollama_base_url=settings.ollama_base_url if settings.ollama_enabled else None
    )


def build_providers(settings: ProvidersSettings, config: MarieConfig) -> list[Provider]:
    """The providers the configuration describes, in its order."""
    return [kinds.build(name, entry, settings) for name, entry in config.providers.items()]


def _deadline(context: Context) -> float | None:
    """The caller's deadline on the monotonic clock the router uses; None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def new_completion_id() -> str:
    """A fresh completion id in OpenAI's shape: "chatcmpl-" and 96 random bits."""
    return f"chatcmpl-{secrets.token_hex(COMPLETION_ID_BYTES)}"


def new_text_completion_id() -> str:
    """A fresh text completion id in OpenAI's shape: "cmpl-" and 96 random bits."""
    return f"cmpl-{secrets.token_hex(COMPLETION_ID_BYTES)}"


def text_chunk(
    chunk: pb.StreamChatCompletionResponse, echo: str = ""
) -> pb.StreamCompletionResponse:
    """A chunk of the shared stream as a text completion chunk; `echo` goes before its text."""
    out = pb.StreamCompletionResponse(
        id=chunk.id,
        model=chunk.model,
        provider=chunk.provider,
        created=chunk.created,
        text=echo + chunk.content if echo else chunk.content,
        finish_reason=chunk.finish_reason,
        logprobs=chunk.logprobs,
    )
    if chunk.HasField("usage"):
        out.usage.CopyFrom(chunk.usage)
    return out


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


@dataclass(frozen=True)
class Core:
    """What the servicer serves from once the component has started."""

    registry: ModelRegistry
    router: Router
    health: HealthMonitor
    #: None when the cache is off.
    cache: ResponseCache | None = None


class ProviderServicer(pb_grpc.ProviderServiceServicer):
    """ProviderService over the registry, router and health monitor the component starts."""

    def __init__(self) -> None:
        self.core: Core | None = None
        self._large = LargeRequests()

    def _core(self) -> Core:
        if self.core is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "NOT_READY",
                "the providers service is not started",
                domain=DOMAIN,
            )
        return self.core

    def _registry(self) -> ModelRegistry:
        return self._core().registry

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: Context
    ) -> pb.ListProvidersResponse:
        registry = self._registry()
        return pb.ListProvidersResponse(providers=[p.to_proto() for p in registry.providers])

    async def GetProviderHealth(
        self, request: pb.GetProviderHealthRequest, context: Context
    ) -> pb.GetProviderHealthResponse:
        # Served from memory: probes run in the background, never in this call.
        return pb.GetProviderHealthResponse(
            providers=self._core().health.snapshot(request.provider)
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        core = self._core()
        access = _access(context)
        async with within_deadline(context):
            models, errors = await core.registry.list_models(
                request.provider,
                force_refresh=request.force_refresh,
                capability=request.capability,
                access=access,
            )
        if not request.provider and request.capability == pb.MODEL_CAPABILITY_UNSPECIFIED:
            # Aliases and splits are models to a caller; they belong to no provider.
            models.extend(core.router.route_models(access))
        return pb.ListModelsResponse(models=models, provider_errors=errors)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        check_get_model_request(request)
        core = self._core()
        access = _access(context)
        if not request.provider and core.router.is_route(request.model):
            route = core.router.route_model(request.model, access)
            if route is None:
                # Told apart from an unknown model by nobody, as for any model.
                raise model_not_found(request.model)
            return pb.GetModelResponse(model=route)
        try:
            async with within_deadline(context):
                model = await core.registry.get_model(request.model, request.provider, access)
        except ServiceError as exc:
            raise as_asked(exc, request.model, request.provider) from None
        return pb.GetModelResponse(model=model)

    async def SearchModels(
        self, request: pb.SearchModelsRequest, context: Context
    ) -> pb.SearchModelsResponse:
        limit = check_search_request(request)
        registry = self._core().registry
        async with within_deadline(context):
            models = await registry.search(request.query, request.provider, limit, _access(context))
        return pb.SearchModelsResponse(models=models)

    async def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, context: Context
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        check_chat_request(request)
        check_policy(request.cache)
        async for chunk in self._relay(request, context, new_completion_id, cache.CHAT):
            yield chunk

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Context
    ) -> pb.CreateChatCompletionResponse:
        if not request.HasField("chat"):
            raise bad_request("chat", "chat is required")
        chat = request.chat
        check_chat_request(chat)
        check_policy(chat.cache)
        chat.aggregate = True
        reply = pb.CreateChatCompletionResponse()
        async for chunk in self._relay(chat, context, new_completion_id, cache.CHAT):
            reply.chunks.append(chunk)
        return reply

    async def StreamCompletion(
        self, request: pb.StreamCompletionRequest, context: Context
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        check_completion_request(request)
        check_policy(request.cache)
        echo = request.prompt if request.echo else ""
        async for chunk in self._relay(request, context, new_text_completion_id, cache.COMPLETIONS):
            out = text_chunk(chunk, echo)
            if chunk.cache:
                out.cache = chunk.cache
            yield out
            echo = ""

    async def _relay(
        self,
        request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest,
        context: Context,
        new_id: Callable[[], str],
        operation: str,
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        """Plan the request's route, open its stream there and pass the chunks on
        (merged where the caller wants only the whole reply); answer from the
        response cache, or store the answer there, as the call's policy says."""
        core = self._core()
        router = core.router
        # A large request leaves a large heap behind: trimmed after the last one.
        large = self._large.started(request.ByteSize())
        direct = True
        try:
            async with within_deadline(context):
                # Every deployment the plan holds is one the caller may use.
                plan = await router.plan(
                    request.model, request.provider, request.user, _access(context)
                )
            # An alias or split names its targets in its errors: they are what is missing.
            direct = plan.kind == pb.ROUTE_KIND_UNSPECIFIED
            completion_id = request.completion_id or new_id()
            cached: Cached | None = None
            if core.cache is not None:
                use, tenant = core.cache.use(operation, request, context.invocation_metadata())
                if use.store:
                    key = cache_key(tenant, operation, [d.id for d in plan.deployments], request)
                    cached = Cached(core.cache, operation, key, tenant, use)
                    async with within_deadline(context):
                        body = await cached.lookup()
                    replay = (
                        cache.replay_chat(
                            body, completion_id, int(time.time()), aggregate=request.aggregate
                        )
                        if body is not None
                        else None
                    )
                    if replay:
                        for chunk in replay:
                            yield chunk
                        return
            # The stream itself is bounded by gRPC: a passed deadline or a client
            # going away cancels this handler, and aclosing then closes the
            # router's stream, which closes the upstream request.
            chunks = router.stream(
                plan,
                request,
                completion_id,
                int(time.time()),
                deadline=_deadline(context),
                background=is_background(context.invocation_metadata()),
                # A caller reading the stream as it comes can start its answer
                # while the model works; one waiting for the whole reply cannot.
                accepted=None if request.aggregate else Acceptance(context, cached is not None),
            )
            async with aclosing(chunks):
                if not request.aggregate:
                    async for chunk in chunks:
                        if cached is not None:
                            cached.sent(chunk)
                        yield chunk
                else:
                    # The caller wants the whole reply: one message where one will do
                    # (every chunk is a gRPC message to send and to read).
                    merger = ChunkMerger()
                    async for chunk in chunks:
                        if (ready := merger.add(chunk)) is not None:
                            if cached is not None:
                                cached.sent(ready)
                            yield ready
                    if (last := merger.flush()) is not None:
                        if cached is not None:
                            cached.sent(last)
                        yield last
            if cached is not None:
                # Reached only when the whole answer went out: an error, a
                # passed deadline or a caller that left stored nothing.
                cached.store()
        except ServiceError as exc:
            raise (as_asked(exc, request.model, request.provider) if direct else exc) from None
        finally:
            if large:
                self._large.ended()

    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: Context
    ) -> pb.CreateEmbeddingsResponse:
        check_embeddings_request(request)
        check_policy(request.cache)
        core = self._core()
        router = core.router
        direct = True
        try:
            async with within_deadline(context):
                plan = await router.plan(
                    request.model, request.provider, request.user, _access(context)
                )
                direct = plan.kind == pb.ROUTE_KIND_UNSPECIFIED
                cached: Cached | None = None
                if core.cache is not None:
                    use, tenant = core.cache.use(
                        cache.EMBEDDINGS, request, context.invocation_metadata()
                    )
                    if use.store:
                        # With how each applies input_type: vectors of another
                        # configuration of the same model are other vectors.
                        targets = [
                            f"{d.id}#{d.provider.embedding_handling}" for d in plan.deployments
                        ]
                        key = cache_key(tenant, cache.EMBEDDINGS, targets, request)
                        cached = Cached(core.cache, cache.EMBEDDINGS, key, tenant, use)
                        body = await cached.lookup()
                        hit = cache.replay_embeddings(body) if body is not None else None
                        if hit is not None:
                            return hit
                reply = await router.embed(
                    plan,
                    request,
                    deadline=_deadline(context),
                    background=is_background(context.invocation_metadata()),
                )
                if cached is not None:
                    cached.store_embeddings(reply)
                    reply.cache = pb.CACHE_RESULT_MISS
                return reply
        except ServiceError as exc:
            raise (as_asked(exc, request.model, request.provider) if direct else exc) from None


class Acceptance:
    """Tells the caller, once, that an upstream accepted the request: the
    stream's initial metadata, sent before its first chunk (marie_kit.acceptance)."""

    __slots__ = ("_cached", "_context", "_told")

    def __init__(self, context: Context, cached: bool) -> None:
        self._context = context
        self._cached = cached
        self._told = False

    async def __call__(self) -> None:
        if self._told:
            # A deployment that failed over before its first chunk was accepted too.
            return
        self._told = True
        result = pb.CACHE_RESULT_MISS if self._cached else pb.CACHE_RESULT_UNSPECIFIED
        await self._context.send_initial_metadata(accepted_metadata(result))


class Cached:
    """One call's part in the response cache: its key, the lookup, the chunks
    of a miss as they go out, and their store once the answer is whole."""

    __slots__ = ("_cache", "_chunks", "_key", "_operation", "_tenant", "_use")

    def __init__(
        self, response_cache: ResponseCache, operation: str, key: str, tenant: str, use: Use
    ) -> None:
        self._cache = response_cache
        self._operation = operation
        self._key = key
        self._tenant = tenant
        self._use = use
        self._chunks: list[pb.StreamChatCompletionResponse] = []

    async def lookup(self) -> bytes | None:
        return await self._cache.lookup(self._operation, self._key, self._tenant, self._use)

    def sent(self, chunk: pb.StreamChatCompletionResponse) -> None:
        """Keep a chunk as it goes out (the first is marked MISS); a chunk
        is never changed once sent."""
        if not self._chunks:
            chunk.cache = pb.CACHE_RESULT_MISS
        self._chunks.append(chunk)

    def store(self) -> None:
        """Store the answer sent, when it is whole (it says why it finished)."""
        kept = self._chunks
        if not cache.complete(kept):
            return
        body = pb.CreateChatCompletionResponse(chunks=kept)
        body.chunks[0].ClearField("cache")
        self._cache.store_later(self._operation, self._key, self._tenant, body.SerializeToString())

    def store_embeddings(self, reply: pb.CreateEmbeddingsResponse) -> None:
        self._cache.store_later(self._operation, self._key, self._tenant, reply.SerializeToString())


async def open_cache(settings: ProvidersSettings) -> ResponseCache | None:
    """The response cache the settings describe; None when it is off."""
    store: SQLiteCacheStore | OpenSearchCacheStore
    if settings.cache_store == "off":
        return None
    if settings.cache_store == "opensearch":
        store = await OpenSearchCacheStore.open(
            settings.opensearch_url,
            prefix=settings.opensearch_index_prefix,
            max_bytes=settings.cache_max_bytes,
        )
    else:
        store = await SQLiteCacheStore.open(settings.cache_file, max_bytes=settings.cache_max_bytes)
    return ResponseCache(
        store,
        cache.Settings(
            ttl_seconds=settings.cache_ttl_seconds,
            max_entry_bytes=settings.cache_max_entry_bytes,
            chat_by_default=settings.cache_chat_by_default,
            lookup_timeout_seconds=settings.cache_lookup_timeout_seconds,
        ),
    )


class ProvidersComponent:
    """The providers service as the kit's server bootstrap runs it.

    `config` is the loaded configuration (read from the settings when None);
    `providers` replaces the providers it describes, for tests that run
    several side by side.
    """

    service_names: Sequence[str] = (SERVICE_NAME,)
    domain: str = DOMAIN

    def __init__(
        self,
        settings: ProvidersSettings,
        *,
        providers: ProviderFactory | None = None,
        config: MarieConfig | None = None,
    ) -> None:
        self.settings = settings
        self.config = config if config is not None else load_config(settings)
        self._build_providers = providers
        self.servicer = ProviderServicer()
        # Calls through Envoy: the key's limits, and the usage ledger for those
        # that spend model capacity. The gateway's own calls pass at the cost
        # of one metadata lookup.
        self.metering = MeteringInterceptor(DOMAIN, METERED, self.config.price_table())
        self.interceptors: Sequence[grpc.aio.ServerInterceptor] = (self.metering,)
        self._metering: MeteringBackends | None = None

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ProviderServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        config = self.config
        if self._build_providers is not None:
            providers = list(self._build_providers(self.settings))
        else:
            providers = build_providers(self.settings, config)
        try:
            registry = ModelRegistry(providers, ttl_seconds=self.settings.model_cache_ttl_seconds)
            router = Router(
                registry,
                aliases=config.aliases,
                splits=config.splits,
                routing=config.routing,
                max_concurrency={
                    name: entry.max_concurrency
                    for name, entry in config.providers.items()
                    if entry.max_concurrency is not None
                },
                background_concurrency={
                    name: entry.background_concurrency
                    for name, entry in config.providers.items()
                    if entry.background_concurrency is not None
                },
            )
        except BaseException:
            for provider in providers:
                await provider.aclose()
            raise
        monitor = HealthMonitor(registry, router, interval=config.routing.health_interval_seconds)
        await monitor.start(self.settings.health_timeout_seconds + FIRST_HEALTH_SLACK_SECONDS)
        try:
            response_cache = await open_cache(self.settings)
        except BaseException:
            await monitor.aclose()
            await registry.aclose()
            raise
        self.servicer.core = Core(registry, router, monitor, response_cache)
        metering = self._metering = MeteringBackends.start(self.settings)
        self.metering.start(metering.limiter, metering.usage.submit, metering.budgets)
        log.info(
            "providers configured",
            extra={
                "providers": {p.name: p.base_url for p in providers},
                "routes": sorted(config.aliases) + sorted(config.splits),
                "auth": self.settings.auth_addr,
                "limits": self.settings.limits,
            },
        )

    async def stopping(self) -> None:
        """Nothing to end early: every call here (chat streams included) is real
        work that finishes on its own, so it gets the grace period."""

    async def close(self) -> None:
        core, self.servicer.core = self.servicer.core, None
        if core is not None:
            core.router.close()
            await core.health.aclose()
            await core.registry.aclose()
            if core.cache is not None:
                await core.cache.close()
        metering, self._metering = self._metering, None
        self.metering.stop()
        if metering is not None:
            await metering.close()
