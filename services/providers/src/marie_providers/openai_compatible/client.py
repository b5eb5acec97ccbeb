"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, LM Studio, Groq, Together,
OpenRouter, DeepSeek, …): `/models`, streamed `/chat/completions`, `/embeddings`.

The stream is read as server-sent events and translated event by event (see
`translate.py` beside it); closing the iterator closes the upstream request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import httpx
import orjson
from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import (
    UpstreamProtocolError,
    UpstreamStatusError,
    model_not_found,
    unsupported,
)
from marie_providers.openai_compatible.translate import (
    ChatStreamTranslator,
    chat_payload,
    chunk_from_completion,
    completion_payload,
    models_from_listing,
    names_stops,
)
from marie_providers.upstream.chunks import ChunkMerger
from marie_providers.upstream.http_provider import JSON_HEADERS, HttpProvider, status_error
from marie_providers.upstream.sse import iter_sse_batches
from marie_providers.upstream.transport import Accepted

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
#: CreateEmbeddingsRequest.input_type as servers that take one spell it.
_INPUT_TYPES = {
    pb.EMBEDDING_INPUT_TYPE_QUERY: "query",
    pb.EMBEDDING_INPUT_TYPE_DOCUMENT: "document",
}


class OpenAICompatibleProvider(HttpProvider):
    """An upstream speaking OpenAI's `/v1` API with a Bearer key (or none, for local servers)."""

    kind = "openai"
    default_base_url = DEFAULT_OPENAI_BASE_URL
    default_api_key_env = ""
    supports_streaming = True
    supports_embeddings = True
    listing_is_detailed = True
    #: Whether `/embeddings` takes inputs as token ids (OpenAI's own and vLLM do).
    accepts_token_inputs = True
    #: Learnt from the upstream's first finished reply: True once one had a
    #: field naming the stop sequence matched (vLLM, SGLang); until then
    #: (and for OpenAI's own API and llama.cpp, always) Marie finds it.
    reports_stop_sequence = False

    def enrich(self, info: pb.ModelInfo, entry: dict[str, Any]) -> None:
        """Add what this kind of upstream's listing says beyond OpenAI's fields."""

    async def _listing(self) -> list[pb.ModelInfo]:
        self.require_credentials()
        body = await self.request_json("GET", "models")
        try:
            pairs = models_from_listing(body, self.name)
        except UpstreamProtocolError as exc:
            raise self._error(exc) from exc
        models = []
        for info, entry in pairs:
            if self.allowed_models is not None and info.name not in self.allowed_models:
                continue
            self.enrich(info, entry)
            models.append(info)
        return models

    async def list_models(self) -> list[pb.ModelInfo]:
        return await self._listing()

    async def model_details(self, name: str) -> pb.ModelInfo:
        # `/models/{id}` is OpenAI's, but many compatible servers lack it; the
        # listing has everything they can tell.
        for info in await self._listing():
            if info.name == name:
                info.details_loaded = True
                return info
        raise model_not_found(name, self.name)

    def first_chunk_is_whole_reply(
        self, request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest
    ) -> bool:
        return request.aggregate

    def stream_chat(
        self,
        request: pb.StreamChatCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        return self._generate(
            "chat/completions",
            lambda stream: chat_payload(request, model_name, stream=stream),
            aggregate=request.aggregate,
            model_name=model_name,
            completion_id=completion_id,
            created=created,
            accepted=accepted,
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
        # OpenAI's legacy endpoint, which vLLM, llama.cpp, LM Studio and others serve too.
        return self._generate(
            "completions",
            lambda stream: completion_payload(request, model_name, stream=stream),
            aggregate=request.aggregate,
            model_name=model_name,
            completion_id=completion_id,
            created=created,
            text=True,
            accepted=accepted,
        )

    async def _generate(
        self,
        path: str,
        payload_for: Callable[[bool], dict[str, Any]],
        *,
        aggregate: bool,
        model_name: str,
        completion_id: str,
        created: int,
        text: bool = False,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """The chunks of one `path` call (`chat/completions`, or `completions` with
        `text`), its body from `payload_for(stream)`; `accepted` as for `stream_chat`."""
        self.require_credentials()
        if aggregate:
            # The caller wants the whole reply: ask for it whole. Servers that
            # ignore stream_options (llama.cpp's Python server) report usage only so.
            body = await self.request_json("POST", path, body=payload_for(False), model=model_name)
            choices = body.get("choices") if isinstance(body, dict) else None
            if isinstance(choices, list) and choices and names_stops(choices[0]):
                self.reports_stop_sequence = True
            try:
                yield chunk_from_completion(
                    body,
                    completion_id=completion_id,
                    model_id=self.model_id(model_name),
                    provider=self.name,
                    created=created,
                    text=text,
                )
            except (UpstreamStatusError, UpstreamProtocolError) as exc:
                raise self._error(exc, model_name) from exc
            return
        payload = orjson.dumps(payload_for(True))
        translator = ChatStreamTranslator(
            completion_id=completion_id,
            model_id=self.model_id(model_name),
            provider=self.name,
            created=created,
            text=text,
        )
        try:
            async with self._upstream.stream(
                path, payload, {**JSON_HEADERS, "accept": "text/event-stream"}, accepted=accepted
            ) as response:
                if response.status_code >= 400:
                    raise status_error(response, await response.aread())
                batches = iter_sse_batches(self._upstream.body(response))
                async with aclosing(batches):
                    async for batch in batches:
                        merger = ChunkMerger()
                        try:
                            for event in batch:
                                if translator.done:
                                    break
                                for chunk in translator.translate(event.data):
                                    if (ready := merger.add(chunk)) is not None:
                                        yield ready
                        except (UpstreamStatusError, UpstreamProtocolError):
                            if (last := merger.flush()) is not None:
                                yield last
                            raise
                        if (last := merger.flush()) is not None:
                            yield last
            # Servers that end the body without "[DONE]" still sent a finish.
            for chunk in translator.flush():
                yield chunk
            if translator.names_stops:
                self.reports_stop_sequence = True
            if not translator.finished:
                raise UpstreamProtocolError(f"{path} stream ended before its finish reason")
        except (httpx.HTTPError, UpstreamStatusError, UpstreamProtocolError) as exc:
            raise self._error(exc, model_name) from exc

    async def embed(
        self, request: pb.CreateEmbeddingsRequest, model_name: str
    ) -> pb.CreateEmbeddingsResponse:
        self.require_credentials()
        inputs: list[Any] = list(request.inputs)
        if request.token_inputs:
            if not self.accepts_token_inputs:
                raise unsupported(
                    self.name,
                    "token_inputs",
                    f"{self.name} cannot embed token ids, only text: send the texts"
                    " themselves (LangChain's OpenAIEmbeddings sends token ids unless"
                    " check_embedding_ctx_length=False)",
                )
            inputs = [list(tokens.ids) for tokens in request.token_inputs]
        body: dict[str, Any] = {
            "model": model_name,
            "input": inputs,
            "encoding_format": "float",
        }
        if request.dimensions:
            body["dimensions"] = request.dimensions
        if request.user:
            body["user"] = request.user
        if self.embedding_input_type and request.input_type in _INPUT_TYPES:
            body["input_type"] = _INPUT_TYPES[request.input_type]
        answer = await self.request_json("POST", "embeddings", body=body, model=model_name)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != len(inputs):
            raise self._error(
                UpstreamProtocolError(
                    f"/embeddings answered {len(data) if isinstance(data, list) else 'no'}"
                    f" embeddings for {len(inputs)} inputs"
                ),
                model_name,
            )
        response = pb.CreateEmbeddingsResponse(model=self.model_id(model_name))
        ordered = sorted(data, key=lambda e: e.get("index", 0) if isinstance(e, dict) else 0)
        for index, entry in enumerate(ordered):
            vector = entry.get("embedding") if isinstance(entry, dict) else None
            try:
                response.embeddings.add(index=index, values=vector)
            except (TypeError, ValueError) as exc:
                malformed = UpstreamProtocolError("an embedding is not a list of numbers")
                raise self._error(malformed, model_name) from exc
        usage = answer.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            response.usage.prompt_tokens = usage["prompt_tokens"]
            total = usage.get("total_tokens")
            response.usage.total_tokens = (
                total if isinstance(total, int) else usage["prompt_tokens"]
            )
        return response

    async def probe(self) -> pb.ProviderHealth:
        return await self.probe_path("models")
