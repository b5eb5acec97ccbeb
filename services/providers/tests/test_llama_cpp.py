"""llama.cpp's server and vLLM as first-class OpenAI-compatible upstreams: what
their listings say beyond OpenAI's fields reaches ModelInfo, and llama.cpp's
completion log probabilities (in chat's shape) are read, whole and streamed.

The shapes are those of llama.cpp's `tools/server` (checked against the
llama-server the test suite runs) and vLLM's OpenAI server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.config import MarieConfig, ProviderConfig, RoutingConfig
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.model_facts import parameter_count
from providers_testkit import Service, running_service

from tests.fakes.openai_server import FakeChatModel, FakeOpenAI

KEY_ENV = "FAKE_LLAMA_KEY"
SETTINGS = ProvidersSettings(
    port=0,
    ollama_enabled=False,
    connect_timeout_seconds=2,
    read_timeout_seconds=5,
    health_timeout_seconds=1,
)
# llama-server's `/v1/models` entry for SmolLM2-135M-Instruct (2 slots of 4096).
LLAMA_META = {
    "vocab_type": 2,
    "n_vocab": 49152,
    "n_ctx": 2048,
    "n_ctx_train": 8192,
    "n_embd": 576,
    "n_params": 134515008,
    "size": 269100288,
    "ftype": "Q4_1",
}
# vLLM's entry for a model served under another name.
VLLM_ENTRY = {"root": "Qwen/Qwen2.5-0.5B-Instruct", "parent": None, "max_model_len": 32768}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(llama_cpp=True)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
async def service(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    server.models = {
        "SmolLM2-135M-Instruct": FakeChatModel(
            "SmolLM2-135M-Instruct",
            reply="Paris is lovely",
            listing={"owned_by": "llamacpp", "meta": LLAMA_META},
        ),
        "qwen": FakeChatModel("qwen", listing={"owned_by": "vllm", **VLLM_ENTRY}),
    }
    cfg = MarieConfig(
        providers={
            "local": ProviderConfig(
                type="openai", base_url=f"{server.base_url}/v1", api_key_env=KEY_ENV
            )
        },
        routing=RoutingConfig(retries=0),
    )
    async with running_service(SETTINGS, config=cfg) as running:
        yield running


async def test_llama_cpp_meta_fills_context_parameters_size_and_quantization(
    service: Service,
) -> None:
    reply = await service.stub.GetModel(pb.GetModelRequest(model="local/SmolLM2-135M-Instruct"))
    model = reply.model

    # What one request may use on this server: its slot's share of the context.
    assert model.context_length == 2048
    assert model.metadata["n_ctx_train"] == "8192"
    assert model.parameters == "135M"
    assert (model.size_bytes, model.size_label) == (269100288, "269.1MB")
    assert model.quantization == "Q4_1"
    assert model.format == "gguf"
    assert model.metadata["n_embd"] == "576"


async def test_vllm_max_model_len_is_the_context_length(service: Service) -> None:
    reply = await service.stub.GetModel(pb.GetModelRequest(model="local/qwen"))

    assert reply.model.context_length == 32768
    assert reply.model.metadata["root"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert reply.model.format == ""


@pytest.mark.parametrize("aggregate", [False, True], ids=["streamed", "whole"])
async def test_llama_cpp_completion_logprobs_are_read(service: Service, aggregate: bool) -> None:
    request = pb.StreamCompletionRequest(
        model="local/SmolLM2-135M-Instruct", prompt="x", logprobs=2, aggregate=aggregate
    )

    chunks = [c async for c in service.stub.StreamCompletion(request)]

    logprobs = [entry for chunk in chunks for entry in chunk.logprobs]
    assert [e.token for e in logprobs] == ["Paris", " is", " lovely"]
    assert [round(e.logprob, 6) for e in logprobs] == [-0.1, -0.2, -0.3]
    assert [[t.token for t in e.top_logprobs] for e in logprobs] == [
        ["Paris", "alt1"],
        [" is", "alt1"],
        [" lovely", "alt1"],
    ]
    assert logprobs[0].bytes == b"Paris"


@pytest.mark.parametrize(
    ("count", "shown"),
    [(134515008, "135M"), (3212749888, "3.2B"), (70553706496, "70.6B"), (8000, "8K"), (0, "")],
)
def test_parameter_counts_read_as_model_names_say_them(count: int, shown: str) -> None:
    assert parameter_count(count) == shown
