"""The Ollama provider: Ollama's HTTP API behind Marie's provider abstraction.

One pooled `httpx.AsyncClient` lives as long as the provider; chat streams
are read as NDJSON and translated line by line (see `translate.py` beside it).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import httpx
import orjson
from google.protobuf import timestamp_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError

from marie_providers.config import ProviderConfig
from marie_providers.errors import (
    UpstreamProtocolError,
    UpstreamStatusError,
    bad_request,
    unsupported,
    upstream_error,
)
from marie_providers.ollama.translate import (
    ChatStreamTranslator,
    GenerateStreamTranslator,
    chat_payload,
    generate_payload,
    model_from_show,
    models_from_listing,
)
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.chunks import ChunkMerger
from marie_providers.upstream.http_provider import fetch_json, status_error
from marie_providers.upstream.ndjson import iter_ndjson_batches
from marie_providers.upstream.provider import Provider
from marie_providers.upstream.transport import Accepted, UpstreamClient

# Ollama queues up to 512 requests by default (OLLAMA_MAX_QUEUE); a smaller
# pool would turn its queueing into our pool timeouts.
MAX_CONNECTIONS = 512
MAX_KEEPALIVE_CONNECTIONS = 32
JSON_HEADERS = {"content-type": "application/json"}


def public_url(url: str) -> str:
    """`url` without user info, so it can be shown in errors, logs and listings."""
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return url
    return str(parsed.copy_with(username=None, password=None))


class OllamaProvider(Provider):
    """An Ollama server: local models, chat, embeddings.

    `transport` replaces the network; tests use it to serve broken answers.
    """

    kind = "ollama"
    supports_streaming = True
    supports_embeddings = True

    def __init__(
        self,
        base_url: str,
        *,
        name: str = "ollama",
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        health_timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self._base_url = public_url(base_url)
        self._health_timeout = health_timeout
        # One client for the provider's lifetime: pooled keep-alive connections
        # spare every request a TCP handshake. The read timeout bounds the gap
        # between two reads, so a long generation is fine, a silent upstream is not.
        self._upstream = UpstreamClient(
            base_url,
            headers={"accept": "application/json, application/x-ndjson"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            transport=transport,
        )
        self._client = self._upstream.http

    @classmethod
    def from_settings(cls, settings: ProvidersSettings) -> OllamaProvider:
        """The provider as the service's settings configure it."""
        return cls(
            settings.ollama_base_url,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            health_timeout=settings.health_timeout_seconds,
        )

    @classmethod
    def from_config(
        cls, name: str, config: ProviderConfig, settings: ProvidersSettings
    ) -> OllamaProvider:
        """The provider as one entry of the configuration describes it."""
        provider = cls(
            config.base_url or settings.ollama_base_url,
            name=name,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            health_timeout=settings.health_timeout_seconds,
        )
        if config.models is not None:
            provider.allowed_models = frozenset(config.models)
        return provider

    @property
    def base_url(self) -> str:
        return self._base_url

    def canonical_model_name(self, model_name: str) -> str:
        # Ollama: an untagged name means ":latest", and names ignore case.
        name = model_name.lower()
        return name if ":" in name.rpartition("/")[2] else name + ":latest"

    def _error(self, exc: Exception, model: str = "", *, quiet: bool = False) -> ServiceError:
        return upstream_error(
            exc, provider=self.name, url=self._base_url, model=model, log_failure=not quiet
        )

    async def _request_json(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        model: str = "",
        timeout: float | None = None,
        quiet: bool = False,
    ) -> Any:
        """One request with a JSON answer; every failure comes back as a ServiceError."""
        try:
            return await fetch_json(self._client, method, path, body=body, timeout=timeout)
        except (httpx.HTTPError, UpstreamStatusError, UpstreamProtocolError) as exc:
            raise self._error(exc, model, quiet=quiet) from exc

    async def list_models(self) -> list[pb.ModelInfo]:
        body = await self._request_json("GET", "/api/tags")
        try:
            return models_from_listing(body, self.name)
        except UpstreamProtocolError as exc:
            raise self._error(exc) from exc

    async def model_details(self, name: str) -> pb.ModelInfo:
        body = await self._request_json("POST", "/api/show", body={"model": name}, model=name)
        try:
            return model_from_show(body, name, self.name)
        except UpstreamProtocolError as exc:
            raise self._error(exc, name) from exc

    def stream_chat(
        self,
        request: pb.StreamChatCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        translator = ChatStreamTranslator(
            completion_id=completion_id,
            model_id=self.model_id(model_name),
            provider=self.name,
            created=created,
        )
        return self._stream_lines(
            "/api/chat", chat_payload(request, model_name), translator, accepted
        )

    def stream_completion(
        self,
        request: pb.StreamCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        translator = GenerateStreamTranslator(
            completion_id=completion_id,
            model_id=self.model_id(model_name),
            provider=self.name,
            created=created,
        )
        return self._stream_lines(
            "/api/generate", generate_payload(request, model_name), translator, accepted
        )

    async def _stream_lines(
        self,
        path: str,
        body: dict[str, Any],
        translator: ChatStreamTranslator,
        accepted: Accepted | None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """The chunks of one streamed NDJSON call (`/api/chat`, `/api/generate`);
        `accepted` as for `stream_chat`."""
        model_name = str(body["model"])
        payload = orjson.dumps(body)
        try:
            # Leaving this block by any route (end, error, the consumer closing
            # us on cancellation) closes the response and so the upstream request.
            async with self._upstream.stream(
                path, payload, JSON_HEADERS, accepted=accepted
            ) as response:
                if response.status_code >= 400:
                    error = status_error(response, await response.aread())
                    if "suffix" in body and "does not support insert" in error.message:
                        # The model has no fill-in-the-middle template: the suffix is at fault.
                        error.param = error.param or "suffix"
                    raise error
                batches = iter_ndjson_batches(self._upstream.body(response))
                async with aclosing(batches):
                    async for batch in batches:
                        # Lines that arrived together go on as one chunk where
                        # they can: per-chunk costs (gRPC message, SSE event)
                        # then shrink as load grows, and nothing waits for it.
                        merger = ChunkMerger()
                        try:
                            for line in batch:
                                # Nothing follows the last line but the end of the body;
                                # reading on to it lets the connection go back to the pool.
                                if translator.finished:
                                    break
                                chunk = translator.translate(line)
                                if chunk is not None and (ready := merger.add(chunk)) is not None:
                                    yield ready
                        except (UpstreamStatusError, UpstreamProtocolError):
                            # What was translated before a bad line still goes out.
                            if (last := merger.flush()) is not None:
                                yield last
                            raise
                        if (last := merger.flush()) is not None:
                            yield last
            if not translator.finished:
                raise UpstreamProtocolError(f"{path} stream ended before its last line")
        except (httpx.HTTPError, UpstreamStatusError, UpstreamProtocolError) as exc:
            raise self._error(exc, model_name) from exc

    async def embed(
        self, request: pb.CreateEmbeddingsRequest, model_name: str
    ) -> pb.CreateEmbeddingsResponse:
        if request.token_inputs:
            raise unsupported(
                self.name,
                "token_inputs",
                f"{self.name} (Ollama) cannot embed token ids, only text: send the texts"
                " themselves (LangChain's OpenAIEmbeddings sends token ids unless"
                " check_embedding_ctx_length=False)",
            )
        body = await self._request_json(
            "POST",
            "/api/embed",
            body={"model": model_name, "input": list(request.inputs)},
            model=model_name,
        )
        vectors = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(request.inputs):
            raise self._error(
                UpstreamProtocolError(
                    f"/api/embed answered {len(vectors) if isinstance(vectors, list) else 'no'}"
                    f" embeddings for {len(request.inputs)} inputs"
                ),
                model_name,
            )
        response = pb.CreateEmbeddingsResponse(model=self.model_id(model_name))
        for index, vector in enumerate(vectors):
            try:
                values = _truncate(vector, request.dimensions) if request.dimensions else vector
                response.embeddings.add(index=index, values=values)
            except (TypeError, ValueError) as exc:
                malformed = UpstreamProtocolError("an embedding is not a list of numbers")
                raise self._error(malformed, model_name) from exc
        prompt_tokens = body.get("prompt_eval_count")
        if isinstance(prompt_tokens, int):
            response.usage.prompt_tokens = prompt_tokens
            response.usage.total_tokens = prompt_tokens
        return response

    async def probe(self) -> pb.ProviderHealth:
        health = pb.ProviderHealth(
            provider=self.name,
            supports_streaming=self.supports_streaming,
            supports_embeddings=self.supports_embeddings,
            default_model=self.default_model,
        )
        started = time.perf_counter()
        try:
            body = await self._request_json(
                "GET", "/api/version", timeout=self._health_timeout, quiet=True
            )
            if not isinstance(body, dict) or not isinstance(body.get("version"), str):
                raise self._error(
                    UpstreamProtocolError("/api/version answered without a version"),
                    quiet=True,
                )
        except ServiceError as exc:
            unreachable = exc.reason in ("PROVIDER_UNAVAILABLE", "UPSTREAM_TIMEOUT")
            health.status = pb.HEALTH_STATUS_ERROR if unreachable else pb.HEALTH_STATUS_UNHEALTHY
            health.error = exc.message
        else:
            health.status = pb.HEALTH_STATUS_HEALTHY
            health.available = True
        health.latency_ms = (time.perf_counter() - started) * 1000
        health.check_time.CopyFrom(_now())
        return health

    async def aclose(self) -> None:
        await self._client.aclose()


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _truncate(vector: list[Any], dimensions: int) -> list[float]:
    """The first `dimensions` values, rescaled to unit length.

    Embedding models trained for truncation (Matryoshka) need the shortened
    vector renormalized, which is also what OpenAI's `dimensions` returns.
    """
    if dimensions > len(vector):
        raise bad_request(
            "dimensions", f"the model's embeddings have only {len(vector)} dimensions"
        )
    head = [float(v) for v in vector[:dimensions]]
    norm = math.sqrt(math.fsum(v * v for v in head))
    return [v / norm for v in head] if norm else head
