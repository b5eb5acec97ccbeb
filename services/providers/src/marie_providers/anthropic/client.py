"""Anthropic's Messages API: Claude models, streamed as typed server-sent events.

`x-api-key` and `anthropic-version` on every request; translation lives in
`translate.py` beside it. Anthropic has no embeddings API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from urllib.parse import quote

import httpx
import orjson
from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.anthropic.translate import (
    MessageStreamTranslator,
    count_chunk,
    count_payload,
    extra_headers,
    messages_payload,
    model_from_entry,
)
from marie_providers.errors import (
    UpstreamProtocolError,
    UpstreamStatusError,
    bad_request,
    unsupported,
)
from marie_providers.upstream.chunks import ChunkMerger
from marie_providers.upstream.http_provider import JSON_HEADERS, HttpProvider, status_error
from marie_providers.upstream.sse import iter_sse_batches
from marie_providers.upstream.transport import Accepted

DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
# The listing pages; one page of the largest size holds every model there is.
LISTING_LIMIT = 1000


class AnthropicProvider(HttpProvider):
    """Claude through the Messages API."""

    kind = "anthropic"
    # Its `message_delta` names the stop sequence that matched.
    reports_stop_sequence = True
    default_base_url = DEFAULT_ANTHROPIC_BASE_URL
    default_api_key_env = "ANTHROPIC_API_KEY"
    supports_streaming = True
    supports_embeddings = False
    # /v1/models/{id} answers with the listing's own entry.
    listing_is_detailed = True

    def auth_headers(self, api_key: str) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    async def list_models(self) -> list[pb.ModelInfo]:
        self.require_credentials()
        body = await self.request_json("GET", f"v1/models?limit={LISTING_LIMIT}")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._error(UpstreamProtocolError("/v1/models answer has no 'data' list"))
        models = [m for m in (model_from_entry(e, self.name) for e in data) if m is not None]
        if self.allowed_models is not None:
            models = [m for m in models if m.name in self.allowed_models]
        models.sort(key=lambda m: m.name)
        return models

    async def model_details(self, name: str) -> pb.ModelInfo:
        self.require_credentials()
        body = await self.request_json("GET", f"v1/models/{quote(name, safe='')}", model=name)
        info = model_from_entry(body, self.name)
        if info is None:
            raise self._error(UpstreamProtocolError("/v1/models/{id} answered without an id"))
        info.details_loaded = True
        return info

    async def stream_chat(
        self,
        request: pb.StreamChatCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        self.require_credentials()
        if request.logprobs:
            raise unsupported(
                self.name, "logprobs", f"{self.name} (Anthropic) does not report log probabilities"
            )
        if request.count_only:
            # Anthropic counts without generating, thinking and server tools included.
            body = await self.request_json(
                "POST",
                "v1/messages/count_tokens",
                body=count_payload(request, model_name),
                model=model_name,
                headers=extra_headers(request.upstream_extras),
            )
            try:
                yield count_chunk(
                    body,
                    completion_id=completion_id,
                    model_id=self.model_id(model_name),
                    provider=self.name,
                    created=created,
                )
            except UpstreamProtocolError as exc:
                raise self._error(exc, model_name) from exc
            return
        payload = orjson.dumps(messages_payload(request, model_name))
        headers = {**JSON_HEADERS, "accept": "text/event-stream"}
        headers.update(extra_headers(request.upstream_extras))
        translator = MessageStreamTranslator(
            completion_id=completion_id,
            model_id=self.model_id(model_name),
            provider=self.name,
            created=created,
        )
        try:
            async with self._upstream.stream(
                "v1/messages", payload, headers, accepted=accepted
            ) as response:
                if response.status_code >= 400:
                    raise status_error(response, await response.aread())
                batches = iter_sse_batches(self._upstream.body(response))
                async with aclosing(batches):
                    async for batch in batches:
                        merger = ChunkMerger()
                        try:
                            for event in batch:
                                chunk = translator.translate(event.event, event.data)
                                if chunk is not None and (ready := merger.add(chunk)) is not None:
                                    yield ready
                        except (UpstreamStatusError, UpstreamProtocolError):
                            if (last := merger.flush()) is not None:
                                yield last
                            raise
                        if (last := merger.flush()) is not None:
                            yield last
            if not translator.finished:
                raise UpstreamProtocolError("message stream ended before its stop reason")
        except (httpx.HTTPError, UpstreamStatusError, UpstreamProtocolError) as exc:
            raise self._error(exc, model_name) from exc

    async def embed(
        self, request: pb.CreateEmbeddingsRequest, model_name: str
    ) -> pb.CreateEmbeddingsResponse:
        raise bad_request("model", f"{self.name} (Anthropic) has no embedding models")

    async def probe(self) -> pb.ProviderHealth:
        return await self.probe_path("v1/models?limit=1")
