"""OllamaProvider against upstreams that misbehave in ways the fake server does not script.

These use httpx's in-process MockTransport to serve exactly the broken bytes
under test (HTML error pages, truncated streams, wrong counts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import httpx
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_providers.ollama.client import OllamaProvider
from providers_testkit import chat, closed_port_url

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
async def answering() -> AsyncIterator[Callable[[Handler], OllamaProvider]]:
    """Makes providers whose upstream is `handler`; closes them after the test."""
    made: list[OllamaProvider] = []

    def make(handler: Handler) -> OllamaProvider:
        provider = OllamaProvider(
            "http://ollama.test:11434", transport=httpx.MockTransport(handler)
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


Answering = Callable[[Handler], OllamaProvider]


async def test_credentials_in_the_base_url_are_never_shown() -> None:
    url = closed_port_url().replace("http://", "http://admin:hunter2@")
    provider = OllamaProvider(url)
    try:
        health = await provider.probe()
    finally:
        await provider.aclose()

    assert "hunter2" not in provider.base_url
    assert "hunter2" not in provider.to_proto().base_url
    assert health.status == pb.HEALTH_STATUS_ERROR
    assert "hunter2" not in health.error


async def test_a_listing_that_is_not_json_is_an_upstream_error(
    answering: Answering,
) -> None:
    provider = answering(lambda _: httpx.Response(200, text="<html>proxy</html>"))

    with pytest.raises(ServiceError) as info:
        await provider.list_models()

    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == "UPSTREAM_ERROR"


async def test_a_gateway_error_page_is_an_upstream_error_with_its_status(
    answering: Answering,
) -> None:
    provider = answering(lambda _: httpx.Response(502, text="<html>Bad Gateway</html>"))

    with pytest.raises(ServiceError) as info:
        await provider.list_models()

    assert info.value.reason == "UPSTREAM_ERROR"
    assert info.value.metadata["upstream_status"] == "502"
    assert "Bad Gateway" in info.value.message


async def test_a_chat_stream_cut_before_its_last_line_is_an_upstream_error(
    answering: Answering,
) -> None:
    body = b'{"message":{"role":"assistant","content":"Hel"},"done":false}\n'
    provider = answering(lambda _: httpx.Response(200, content=body))
    chunks: list[pb.StreamChatCompletionResponse] = []

    with pytest.raises(ServiceError) as info:
        async for chunk in provider.stream_chat(chat("ollama/m"), "m", "chatcmpl-1", 0):
            chunks.append(chunk)

    assert [c.content for c in chunks] == ["Hel"]
    assert info.value.reason == "UPSTREAM_ERROR"


async def test_embeddings_of_the_wrong_count_are_an_upstream_error(
    answering: Answering,
) -> None:
    provider = answering(lambda _: httpx.Response(200, json={"embeddings": [[0.1]]}))
    request = pb.CreateEmbeddingsRequest(model="ollama/e", inputs=["a", "b"])

    with pytest.raises(ServiceError) as info:
        await provider.embed(request, "e")

    assert info.value.reason == "UPSTREAM_ERROR"
    assert "1 embeddings for 2 inputs" in info.value.message


async def test_more_dimensions_than_the_model_has_is_invalid(answering: Answering) -> None:
    provider = answering(lambda _: httpx.Response(200, json={"embeddings": [[0.6, 0.8]]}))
    request = pb.CreateEmbeddingsRequest(model="ollama/e", inputs=["a"], dimensions=3)

    with pytest.raises(ServiceError) as info:
        await provider.embed(request, "e")

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.metadata["field"] == "dimensions"


async def test_a_version_answer_without_a_version_is_unhealthy(
    answering: Answering,
) -> None:
    provider = answering(lambda _: httpx.Response(200, json={"status": "ok"}))

    health = await provider.probe()

    assert health.status == pb.HEALTH_STATUS_UNHEALTHY
    assert not health.available
    assert health.error


async def test_a_rate_limited_embedding_is_resource_exhausted(
    answering: Answering,
) -> None:
    provider = answering(lambda _: httpx.Response(429, json={"error": "slow down"}))
    request = pb.CreateEmbeddingsRequest(model="ollama/e", inputs=["a"])

    with pytest.raises(ServiceError) as info:
        await provider.embed(request, "e")

    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.reason == "UPSTREAM_RATE_LIMITED"
    assert "slow down" in info.value.message


def _lines(*objects: str) -> bytes:
    return b"".join(o.encode() + b"\n" for o in objects)


_HEL = '{"message":{"role":"assistant","content":"Hel"},"done":false}'
_LO = '{"message":{"role":"assistant","content":"lo"},"done":false}'
_BANG = '{"message":{"role":"assistant","content":"!"},"done":false}'
_DONE = (
    '{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    '"prompt_eval_count":3,"eval_count":3}'
)


async def test_lines_that_arrive_together_go_on_as_one_chunk(answering: Answering) -> None:
    # One read holds the whole reply: one chunk says it all, in OpenAI's shape
    # (role and content first, the finish reason with the last content).
    provider = answering(lambda _: httpx.Response(200, content=_lines(_HEL, _LO, _BANG, _DONE)))

    chunks = [c async for c in provider.stream_chat(chat("ollama/m"), "m", "chatcmpl-1", 0)]

    assert len(chunks) == 1
    (chunk,) = chunks
    assert (chunk.role, chunk.content) == (pb.ROLE_ASSISTANT, "Hello!")
    assert chunk.finish_reason == pb.FINISH_REASON_STOP
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (3, 3)


async def test_lines_that_arrive_apart_stream_apart(answering: Answering) -> None:
    async def body() -> AsyncIterator[bytes]:
        for line in (_HEL, _LO, _BANG, _DONE):
            yield _lines(line)

    provider = answering(lambda _: httpx.Response(200, content=body()))

    chunks = [c async for c in provider.stream_chat(chat("ollama/m"), "m", "chatcmpl-1", 0)]

    assert [c.content for c in chunks] == ["Hel", "lo", "!", ""]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_chunks_before_a_mid_batch_error_line_are_still_sent(answering: Answering) -> None:
    body = _lines(_HEL, _LO, '{"error":"model runner crashed"}')
    provider = answering(lambda _: httpx.Response(200, content=body))
    chunks: list[pb.StreamChatCompletionResponse] = []

    with pytest.raises(ServiceError) as info:
        async for chunk in provider.stream_chat(chat("ollama/m"), "m", "chatcmpl-1", 0):
            chunks.append(chunk)

    assert [c.content for c in chunks] == ["Hello"]
    assert "model runner crashed" in info.value.message


async def test_tool_call_chunks_are_not_merged_with_content(answering: Answering) -> None:
    call = (
        '{"message":{"role":"assistant","content":"","tool_calls":[{"function":'
        '{"name":"f","arguments":{"x":1}}}]},"done":false}'
    )
    provider = answering(lambda _: httpx.Response(200, content=_lines(_HEL, call, _DONE)))

    chunks = [c async for c in provider.stream_chat(chat("ollama/m"), "m", "chatcmpl-1", 0)]

    assert [c.content for c in chunks] == ["Hel", "", ""]
    assert [len(c.tool_calls) for c in chunks] == [0, 1, 0]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
