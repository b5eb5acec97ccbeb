"""How each ProviderService call through Envoy is metered: the calls that
spend model capacity and how their usage is read, and the lookups, which
are only counted. The table the kit's `MeteringInterceptor` meters gRPC calls
through Envoy by (the key's limits and the usage ledger, `marie_kit.metering`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.metering import COUNTED, Metered, Report

_SERVICE = pb.DESCRIPTOR.services_by_name["ProviderService"].full_name


def _provider_of(model: str) -> str:
    """ "ollama" of "ollama/llama3.2"; "" for a bare name."""
    provider, slash, _ = model.partition("/")
    return provider if slash else ""


def _requested(request: Any) -> tuple[str, str]:
    """(provider, model) a request asks for, as it names them."""
    model: str = request.model
    return (request.provider or _provider_of(model)), model


def _chunk(
    chunk: pb.StreamChatCompletionResponse | pb.StreamCompletionResponse,
) -> Report:
    if chunk.cache == pb.CACHE_RESULT_HIT:
        # Replayed: no upstream call, no tokens spent.
        return Report(chunk.provider, chunk.model, cached=True)
    if chunk.HasField("usage") and not chunk.usage.counted_only:
        return Report(
            chunk.provider,
            chunk.model,
            chunk.usage.prompt_tokens,
            chunk.usage.completion_tokens,
            has_usage=True,
            cached_prompt_tokens=chunk.usage.cached_prompt_tokens,
        )
    return Report(chunk.provider, chunk.model)


def _whole_chat(response: pb.CreateChatCompletionResponse) -> Report:
    """A whole reply: who served it, and the usage its chunks carry."""
    if not response.chunks:
        return Report("", "")
    first = response.chunks[0]
    if first.cache == pb.CACHE_RESULT_HIT:
        return Report(first.provider, first.model, cached=True)
    prompt = completion = cached = 0
    has_usage = False
    for chunk in response.chunks:
        if chunk.HasField("usage") and not chunk.usage.counted_only:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
            cached += chunk.usage.cached_prompt_tokens
            has_usage = True
    return Report(
        first.provider,
        first.model,
        prompt,
        completion,
        has_usage=has_usage,
        cached_prompt_tokens=cached,
    )


def _embeddings(response: pb.CreateEmbeddingsResponse) -> Report:
    if response.cache == pb.CACHE_RESULT_HIT:
        return Report(_provider_of(response.model), response.model, cached=True)
    return Report(
        _provider_of(response.model),
        response.model,
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
        has_usage=response.HasField("usage"),
    )


#: gRPC full method -> how it is metered (ledger operations as the gateway's);
#: every other method is a lookup, counted against requests only.
METERED: Mapping[str, Metered] = MappingProxyType(
    {
        **{
            f"/{_SERVICE}/{method.name}": COUNTED
            for method in pb.DESCRIPTOR.services_by_name["ProviderService"].methods
        },
        f"/{_SERVICE}/StreamChatCompletion": Metered("chat", _requested, _chunk),
        f"/{_SERVICE}/CreateChatCompletion": Metered(
            "chat", lambda request: _requested(request.chat), _whole_chat
        ),
        f"/{_SERVICE}/StreamCompletion": Metered("completions", _requested, _chunk),
        f"/{_SERVICE}/CreateEmbeddings": Metered("embeddings", _requested, _embeddings),
    }
)
