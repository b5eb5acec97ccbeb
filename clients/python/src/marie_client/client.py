"""MarieClient: one long-lived channel to Marie's ProviderService."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.memory.v1 import memory_service_pb2_grpc as memory_grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc

from marie_client.chat import ChatStream, MessageLike, to_messages
from marie_client.errors import MarieError

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_STREAM_TIMEOUT_SECONDS = 600.0


class MarieClient:
    """Marie over gRPC, direct or through Envoy.

    ``address`` is ``host:port``; ``api_key`` travels as ``authorization:
    Bearer …`` on every call. Lookups get ``timeout`` seconds; chat streams
    and the unary calls that wait for a model (``CreateChatCompletion``,
    ``CreateEmbeddings``, ``AddMemories``) get ``stream_timeout`` (both
    overridable per call). Failed calls raise
    :class:`MarieError`. Use one client for many calls (``async with`` or
    :meth:`close`): the channel and its connection are reused.
    """

    def __init__(
        self,
        address: str,
        api_key: str,
        *,
        tls: bool | grpc.ChannelCredentials = False,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT_SECONDS,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if tls is False:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials() if tls is True else tls
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        #: Metadata every call carries; pass it yourself to the raw stub.
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),)
        #: The generated stub, for anything the helpers below do not cover.
        self.providers = pb_grpc.ProviderServiceStub(self.channel)
        #: AuthService and MemoryService on the same channel: through Envoy
        #: (one address for every routed service) or with a client made for
        #: that service's own address. Call them with :meth:`call`.
        self.auth = auth_grpc.AuthServiceStub(self.channel)
        self.memory = memory_grpc.MemoryServiceStub(self.channel)
        # Unary calls that wait for a model: a lookup's deadline would cut them off.
        self._model_calls = (
            self.providers.CreateChatCompletion,
            self.providers.CreateEmbeddings,
            self.memory.AddMemories,
        )

    async def __aenter__(self) -> MarieClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """One unary call of any generated stub method on this channel, e.g.
        ``await marie.call(marie.auth.ListApiKeys, auth_pb.ListApiKeysRequest())``,
        with the key, the default deadline and :class:`MarieError` on failure."""
        if timeout is None:
            waits_for_model = any(method is call for call in self._model_calls)
            timeout = self.stream_timeout if waits_for_model else self.timeout
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise MarieError.from_rpc_error(error) from None

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        return await self.call(method, request, timeout=timeout)

    async def list_providers(self, *, timeout: float | None = None) -> list[pb.Provider]:
        response = await self._unary(
            self.providers.ListProviders, pb.ListProvidersRequest(), timeout
        )
        return list(response.providers)

    async def get_provider_health(
        self, provider: str = "", *, timeout: float | None = None
    ) -> list[pb.ProviderHealth]:
        request = pb.GetProviderHealthRequest(provider=provider)
        response = await self._unary(self.providers.GetProviderHealth, request, timeout)
        return list(response.providers)

    async def list_models(
        self,
        *,
        provider: str = "",
        capability: pb.ModelCapability | None = None,
        force_refresh: bool = False,
        timeout: float | None = None,
    ) -> pb.ListModelsResponse:
        """Every model (``.models``) and providers that failed to list (``.provider_errors``)."""
        request = pb.ListModelsRequest(
            provider=provider, capability=capability, force_refresh=force_refresh
        )
        response: pb.ListModelsResponse = await self._unary(
            self.providers.ListModels, request, timeout
        )
        return response

    async def get_model(
        self, model: str, *, provider: str = "", timeout: float | None = None
    ) -> pb.ModelInfo:
        """One model's details; ``model`` is ``provider/name`` or a bare name."""
        request = pb.GetModelRequest(model=model, provider=provider)
        response = await self._unary(self.providers.GetModel, request, timeout)
        info: pb.ModelInfo = response.model
        return info

    async def search_models(
        self, query: str, *, provider: str = "", limit: int = 0, timeout: float | None = None
    ) -> list[pb.ModelInfo]:
        request = pb.SearchModelsRequest(query=query, provider=provider, limit=limit)
        response = await self._unary(self.providers.SearchModels, request, timeout)
        return list(response.models)

    def stream_chat(
        self,
        model: str,
        messages: Iterable[MessageLike],
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        provider: str = "",
        user: str = "",
        request: pb.StreamChatCompletionRequest | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        """Start a chat completion and return its stream of chunks.

        ``messages`` are ChatMessage or ``{"role": "user", "content": "…"}``
        dicts. For options not listed here pass a whole ``request``.
        """
        if request is None:
            sampling = pb.SamplingParameters(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_tokens=max_tokens,
                stop=stop,
                seed=seed,
            )
            request = pb.StreamChatCompletionRequest(
                model=model,
                provider=provider,
                messages=to_messages(messages),
                sampling=sampling,
                user=user,
            )
        call = self.providers.StreamChatCompletion(
            request, metadata=self.metadata, timeout=timeout or self.stream_timeout
        )
        return ChatStream(call)

    async def create_embeddings(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        dimensions: int = 0,
        provider: str = "",
        timeout: float | None = None,
    ) -> pb.CreateEmbeddingsResponse:
        request = pb.CreateEmbeddingsRequest(
            model=model, inputs=inputs, dimensions=dimensions, provider=provider
        )
        response: pb.CreateEmbeddingsResponse = await self._unary(
            self.providers.CreateEmbeddings, request, timeout
        )
        return response
