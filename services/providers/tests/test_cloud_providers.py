"""The OpenAI-compatible, Hugging Face and Anthropic providers through the real gRPC service,
against local servers speaking each upstream's wire protocol."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.config import MarieConfig, ProviderConfig, RoutingConfig
from marie_providers.settings import ProvidersSettings
from providers_testkit import Service, chat, closed_port_url, running_service, stream_outcome, user

from tests.fakes.anthropic_server import FakeAnthropic, FakeClaude
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.fakes.upstream import Cue
from tests.grpc_testing import rpc_error

KEY_ENV = "FAKE_UPSTREAM_KEY"
WEATHER_TOOL = pb.Tool(
    type="function",
    function=pb.FunctionDefinition(
        name="get_weather",
        description="Weather in a city",
        parameters=struct_pb2.Struct(fields={"type": struct_pb2.Value(string_value="object")}),
    ),
)
# No retries unless a test asks: failures show at once.
NO_RETRIES = RoutingConfig(retries=0, first_token_timeout_seconds=2)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def hf_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(huggingface=True) as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def oai(openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    openai_server.reset()
    openai_server.models = {
        "gpt-fake": FakeChatModel("gpt-fake", reply="Hello there, friend"),
        "tooly": FakeChatModel(
            "tooly", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]
        ),
        "endless": FakeChatModel("endless", endless=True, chunk_delay=0.01),
        "embedder": FakeChatModel("embedder", embedding_dimension=4),
    }
    monkeypatch.setenv(KEY_ENV, openai_server.api_key)
    return openai_server


@pytest.fixture
def claude(anthropic_server: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> FakeAnthropic:
    anthropic_server.reset()
    anthropic_server.models = {
        "claude-fake": FakeClaude("claude-fake", reply="Bonjour from Claude"),
        "claude-tools": FakeClaude(
            "claude-tools", tool_uses=[{"name": "get_weather", "input": {"city": "Paris"}}]
        ),
        "claude-endless": FakeClaude("claude-endless", endless=True, chunk_delay=0.01),
    }
    monkeypatch.setenv(KEY_ENV, anthropic_server.api_key)
    return anthropic_server


@pytest.fixture
def hf(hf_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    hf_server.reset()
    hf_server.models = {
        "meta-llama/Llama-3.1-8B-Instruct": FakeChatModel(
            "meta-llama/Llama-3.1-8B-Instruct",
            reply="Hi from the hub",
            listing={
                "providers": [
                    {
                        "provider": "groq",
                        "status": "live",
                        "context_length": 131072,
                        "supports_tools": True,
                    },
                    {"provider": "together", "status": "staging", "context_length": 8192},
                ],
                "architecture": {"input_modalities": ["text"]},
            },
        ),
        "HuggingFaceH4/zephyr-7b-beta": FakeChatModel(
            "HuggingFaceH4/zephyr-7b-beta",
            listing={"providers": [{"provider": "featherless-ai", "status": "live"}]},
        ),
    }
    monkeypatch.setenv("FAKE_HF_TOKEN", hf_server.api_key)
    return hf_server


def settings_for_tests() -> ProvidersSettings:
    return ProvidersSettings(
        port=0,
        ollama_enabled=False,
        connect_timeout_seconds=2,
        read_timeout_seconds=5,
        health_timeout_seconds=1,
    )


def one_provider(
    name: str, entry: ProviderConfig, routing: RoutingConfig = NO_RETRIES
) -> MarieConfig:
    return MarieConfig(providers={name: entry}, routing=routing)


@pytest.fixture
async def openai_service(oai: FakeOpenAI) -> AsyncIterator[Service]:
    entry = ProviderConfig(type="openai", base_url=f"{oai.base_url}/v1", api_key_env=KEY_ENV)
    async with running_service(settings_for_tests(), config=one_provider("oai", entry)) as service:
        oai.reset()
        yield service


@pytest.fixture
async def anthropic_service(claude: FakeAnthropic) -> AsyncIterator[Service]:
    entry = ProviderConfig(type="anthropic", base_url=claude.base_url, api_key_env=KEY_ENV)
    async with running_service(
        settings_for_tests(), config=one_provider("claude", entry)
    ) as service:
        claude.reset()
        yield service


def text_of(chunks: list[pb.StreamChatCompletionResponse]) -> str:
    return "".join(c.content for c in chunks)


def calls_of(chunks: list[pb.StreamChatCompletionResponse]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id
            call["name"] += delta.name
            call["arguments"] += delta.arguments
    return calls


# ---------------------------------------------------------------------------
# OpenAI-compatible
# ---------------------------------------------------------------------------


async def test_openai_streams_text_with_role_finish_and_usage(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    chunks, error = await stream_outcome(
        openai_service.stub.StreamChatCompletion(chat("oai/gpt-fake", user="u-1"))
    )

    assert error is None
    assert text_of(chunks) == "Hello there, friend"
    assert chunks[0].role == pb.ROLE_ASSISTANT
    assert {c.model for c in chunks} == {"oai/gpt-fake"}
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 3
    [sent] = oai.requests_to("/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {oai.api_key}"
    assert sent.body["model"] == "gpt-fake"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["user"] == "u-1"
    assert sent.body["messages"] == [{"role": "user", "content": "hi there"}]


async def test_openai_tool_call_deltas_assemble_into_calls(openai_service: Service) -> None:
    request = chat("oai/tooly", tools=[WEATHER_TOOL])
    chunks, error = await stream_outcome(openai_service.stub.StreamChatCompletion(request))

    assert error is None
    assert calls_of(chunks) == {
        0: {"id": "call_fake0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    }
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_openai_request_carries_sampling_tools_and_tool_results(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    history = [
        user("weather?"),
        pb.ChatMessage(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[
                pb.ToolCall(
                    id="call_1",
                    type="function",
                    function=pb.FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
                )
            ],
        ),
        pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny"),
    ]
    request = chat(
        "oai/gpt-fake",
        *history,
        tools=[WEATHER_TOOL],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        sampling=pb.SamplingParameters(temperature=0.7, max_tokens=50, stop=["END"]),
    )
    await stream_outcome(openai_service.stub.StreamChatCompletion(request))

    [sent] = oai.requests_to("/v1/chat/completions")
    assert sent.body["temperature"] == 0.7
    assert sent.body["max_tokens"] == 50
    assert sent.body["stop"] == ["END"]
    assert sent.body["tool_choice"] == "required"
    assert sent.body["tools"][0]["function"]["name"] == "get_weather"
    assert sent.body["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert sent.body["messages"][2] == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": "call_1",
    }


async def test_openai_lists_models_and_details(openai_service: Service) -> None:
    reply = await openai_service.stub.ListModels(pb.ListModelsRequest())
    model = await openai_service.stub.GetModel(pb.GetModelRequest(model="oai/gpt-fake"))

    assert [m.id for m in reply.models] == [
        "oai/embedder",
        "oai/endless",
        "oai/gpt-fake",
        "oai/tooly",
    ]
    assert model.model.name == "gpt-fake"
    assert model.model.modified_time.seconds > 0
    assert model.model.metadata["owned_by"] == "fake"


async def test_openai_embeddings(openai_service: Service, oai: FakeOpenAI) -> None:
    reply = await openai_service.stub.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(model="oai/embedder", inputs=["a b", "c"])
    )

    assert reply.model == "oai/embedder"
    assert [len(e.values) for e in reply.embeddings] == [4, 4]
    assert reply.usage.prompt_tokens == 3
    [sent] = oai.requests_to("/v1/embeddings")
    assert sent.body["input"] == ["a b", "c"]


async def test_openai_embeddings_send_no_input_type_unless_configured(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    reply = await openai_service.stub.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(
            model="oai/embedder", inputs=["a b"], input_type=pb.EMBEDDING_INPUT_TYPE_QUERY
        )
    )

    assert reply.input_handling == ""
    [sent] = oai.requests_to("/v1/embeddings")
    assert "input_type" not in sent.body
    assert sent.body["input"] == ["a b"]


@pytest.mark.parametrize(
    ("input_type", "sent_type"),
    [
        (pb.EMBEDDING_INPUT_TYPE_QUERY, "query"),
        (pb.EMBEDDING_INPUT_TYPE_DOCUMENT, "document"),
        (pb.EMBEDDING_INPUT_TYPE_UNSPECIFIED, None),
    ],
)
async def test_embedding_input_type_is_passed_upstream_when_configured(
    oai: FakeOpenAI, input_type: pb.EmbeddingInputType, sent_type: str | None
) -> None:
    entry = ProviderConfig(
        type="openai",
        base_url=f"{oai.base_url}/v1",
        api_key_env=KEY_ENV,
        embedding_input_type=True,
    )
    async with running_service(settings_for_tests(), config=one_provider("oai", entry)) as service:
        oai.reset()
        reply = await service.stub.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="oai/embedder", inputs=["a b"], input_type=input_type)
        )

    assert reply.input_handling == "input_type"
    [sent] = oai.requests_to("/v1/embeddings")
    assert sent.body.get("input_type") == sent_type
    assert sent.body["input"] == ["a b"]


async def test_cached_vectors_of_other_prefixes_are_not_served(
    oai: FakeOpenAI, tmp_path: Path
) -> None:
    """The response cache keys embeddings on how the provider applies
    input_type: after a change of prefixes the same request is a miss (and
    the upstream is asked), never the old configuration's vectors."""
    settings = settings_for_tests().model_copy(update={"data_dir": tmp_path})
    caller = (("x-marie-key-id", "key-1"), ("x-marie-owner", "team-a"))
    request = pb.CreateEmbeddingsRequest(
        model="oai/embedder", inputs=["a b"], input_type=pb.EMBEDDING_INPUT_TYPE_QUERY
    )
    results = []
    for prefix in ("query: ", "query: ", "search_query: "):
        entry = ProviderConfig.model_validate(
            {
                "type": "openai",
                "base_url": f"{oai.base_url}/v1",
                "api_key_env": KEY_ENV,
                "embedding_prefixes": {"query": prefix, "document": "passage: "},
            }
        )
        async with running_service(settings, config=one_provider("oai", entry)) as service:
            reply = await service.stub.CreateEmbeddings(request, metadata=caller)
            results.append((reply.cache, reply.input_handling.startswith("prefixes:")))
            await asyncio.sleep(0.2)  # the background store of a miss

    assert results == [
        (pb.CACHE_RESULT_MISS, True),
        (pb.CACHE_RESULT_HIT, True),
        (pb.CACHE_RESULT_MISS, True),
    ]
    sent = [r.body["input"] for r in oai.requests_to("/v1/embeddings")]
    assert sent[-1] == ["search_query: a b"]


async def test_embedding_prefixes_are_put_before_the_texts(oai: FakeOpenAI) -> None:
    entry = ProviderConfig.model_validate(
        {
            "type": "openai",
            "base_url": f"{oai.base_url}/v1",
            "api_key_env": KEY_ENV,
            "embedding_prefixes": {"query": "query: ", "document": "passage: "},
        }
    )
    async with running_service(settings_for_tests(), config=one_provider("oai", entry)) as service:
        oai.reset()
        handlings = []
        for input_type in (
            pb.EMBEDDING_INPUT_TYPE_QUERY,
            pb.EMBEDDING_INPUT_TYPE_DOCUMENT,
            pb.EMBEDDING_INPUT_TYPE_UNSPECIFIED,
        ):
            reply = await service.stub.CreateEmbeddings(
                pb.CreateEmbeddingsRequest(
                    model="oai/embedder", inputs=["a b", "c"], input_type=input_type
                )
            )
            handlings.append(reply.input_handling)
            assert [e.index for e in reply.embeddings] == [0, 1]

    sent = [r.body for r in oai.requests_to("/v1/embeddings")]
    assert [b["input"] for b in sent] == [
        ["query: a b", "query: c"],
        ["passage: a b", "passage: c"],
        ["a b", "c"],
    ]
    assert all("input_type" not in b for b in sent)
    # One handling per configuration, whatever the request said.
    assert len(set(handlings)) == 1 and handlings[0].startswith("prefixes:")


async def test_an_unknown_input_type_is_invalid_argument(openai_service: Service) -> None:
    error = await rpc_error(
        openai_service.stub.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="oai/embedder", inputs=["a"], input_type=7)  # type: ignore[arg-type]
        )
    )

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == "input_type"


@pytest.mark.parametrize(
    ("cue", "code", "reason"),
    [
        (Cue.status_error(401), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_AUTH_FAILED"),
        (Cue.status_error(403), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_AUTH_FAILED"),
        (
            Cue.status_error(429, retry_after="7"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
        ),
        (Cue.status_error(500), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
        (Cue.status_error(503), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
    ],
)
async def test_openai_upstream_statuses_map_to_the_error_table(
    openai_service: Service, oai: FakeOpenAI, cue: Cue, code: grpc.StatusCode, reason: str
) -> None:
    oai.fail_next(cue)
    chunks, error = await stream_outcome(
        openai_service.stub.StreamChatCompletion(chat("oai/gpt-fake"))
    )

    assert chunks == []
    assert error is not None
    assert (error.code, error.reason) == (code, reason)
    assert oai.base_url.removeprefix("http://") not in error.message
    if cue.status == 429:
        assert error.metadata["retry_after_seconds"] == "7"


async def test_openai_unknown_model_is_model_not_found(openai_service: Service) -> None:
    _, error = await stream_outcome(openai_service.stub.StreamChatCompletion(chat("oai/nope")))

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_openai_400_with_param_is_invalid_argument_naming_it(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    oai.fail_next(
        Cue.status_error(400, message="temperature is too high for this model", param="temperature")
    )
    _, error = await stream_outcome(openai_service.stub.StreamChatCompletion(chat("oai/gpt-fake")))

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST")
    assert error.metadata["field"] == "temperature"
    assert "temperature is too high" in error.message


async def test_openai_hang_before_first_byte_ends_at_the_deadline_and_closes_upstream(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    oai.fail_next(Cue.hang())
    started = time.monotonic()
    _, error = await stream_outcome(
        openai_service.stub.StreamChatCompletion(chat("oai/gpt-fake"), timeout=1)
    )

    assert error is not None
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    assert await asyncio.to_thread(oai.wait_for_disconnect, 1)


async def test_openai_dying_mid_stream_ends_the_call_after_the_chunks_sent(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    oai.fail_next(Cue.die_after(2))
    chunks, error = await stream_outcome(
        openai_service.stub.StreamChatCompletion(chat("oai/gpt-fake"))
    )

    assert text_of(chunks) == "Hello there,"
    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR")


async def test_openai_cancelled_call_closes_the_upstream_stream(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    call = openai_service.stub.StreamChatCompletion(chat("oai/endless"))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    call.cancel()

    assert await asyncio.to_thread(oai.wait_for_disconnect, 1)


async def test_openai_without_its_key_is_unavailable_naming_the_variable(
    oai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    entry = ProviderConfig(type="openai", base_url=f"{oai.base_url}/v1", api_key_env=KEY_ENV)
    async with running_service(settings_for_tests(), config=one_provider("oai", entry)) as service:
        _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("oai/gpt-fake")))
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())

    assert error is not None
    assert error.reason == "UPSTREAM_AUTH_FAILED"
    assert KEY_ENV in error.message
    assert oai.api_key not in error.message
    [entry_health] = health.providers
    assert not entry_health.available
    assert KEY_ENV in entry_health.error
    assert oai.requests_to("/v1/chat/completions") == []


# ---------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------


async def test_hf_without_a_token_lists_the_curated_models_and_says_why_unavailable(
    hf: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAKE_HF_TOKEN")
    entry = ProviderConfig(
        type="huggingface", base_url=f"{hf.base_url}/v1", api_key_env="FAKE_HF_TOKEN"
    )
    async with running_service(settings_for_tests(), config=one_provider("hf", entry)) as service:
        models = await service.stub.ListModels(pb.ListModelsRequest())
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())
        _, error = await stream_outcome(
            service.stub.StreamChatCompletion(chat("hf/HuggingFaceH4/zephyr-7b-beta"))
        )

    assert [m.id for m in models.models] == [
        "hf/HuggingFaceH4/zephyr-7b-beta",
        "hf/meta-llama/Llama-2-13b-chat-hf",
        "hf/meta-llama/Llama-2-7b-chat-hf",
        "hf/mistralai/Mistral-7B-Instruct-v0.2",
        "hf/tiiuae/falcon-7b-instruct",
    ]
    assert all(m.description for m in models.models)
    [provider] = health.providers
    assert provider.status == pb.HEALTH_STATUS_UNHEALTHY
    assert not provider.available
    assert provider.error == "hf has no token: set the environment variable FAKE_HF_TOKEN"
    assert error is not None and error.reason == "UPSTREAM_AUTH_FAILED"
    assert hf.requests == []


async def test_hf_with_a_token_merges_the_router_listing_into_the_curated_one(
    hf: FakeOpenAI,
) -> None:
    entry = ProviderConfig(
        type="huggingface", base_url=f"{hf.base_url}/v1", api_key_env="FAKE_HF_TOKEN"
    )
    async with running_service(settings_for_tests(), config=one_provider("hf", entry)) as service:
        models = await service.stub.ListModels(pb.ListModelsRequest())
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())

    by_id = {m.id: m for m in models.models}
    assert len(by_id) == 6
    live = by_id["hf/meta-llama/Llama-3.1-8B-Instruct"]
    assert live.context_length == 131072
    assert pb.MODEL_CAPABILITY_TOOLS in live.capabilities
    assert live.metadata["providers"] == "groq=live,together=staging"
    zephyr = by_id["hf/HuggingFaceH4/zephyr-7b-beta"]
    assert zephyr.description.startswith("Zephyr 7B")
    assert zephyr.metadata["providers"] == "featherless-ai=live"
    [provider] = health.providers
    assert provider.available
    assert provider.models_count == 6


async def test_hf_chat_keeps_the_routing_suffix_of_the_hub_id(hf: FakeOpenAI) -> None:
    entry = ProviderConfig(
        type="huggingface", base_url=f"{hf.base_url}/v1", api_key_env="FAKE_HF_TOKEN"
    )
    async with running_service(settings_for_tests(), config=one_provider("hf", entry)) as service:
        chunks, error = await stream_outcome(
            service.stub.StreamChatCompletion(chat("hf/meta-llama/Llama-3.1-8B-Instruct:fastest"))
        )
        details = await service.stub.GetModel(
            pb.GetModelRequest(model="hf/meta-llama/Llama-3.1-8B-Instruct:groq")
        )

    assert error is None
    assert text_of(chunks) == "Hi from the hub"
    assert chunks[0].model == "hf/meta-llama/Llama-3.1-8B-Instruct:fastest"
    [sent] = hf.requests_to("/v1/chat/completions")
    assert sent.body["model"] == "meta-llama/Llama-3.1-8B-Instruct:fastest"
    assert sent.headers["authorization"] == f"Bearer {hf.api_key}"
    assert details.model.context_length == 131072


async def test_a_bare_hub_id_with_a_routing_suffix_goes_to_the_hugging_face_provider(
    hf: FakeOpenAI, fake: FakeOllama
) -> None:
    hub = ProviderConfig(
        type="huggingface", base_url=f"{hf.base_url}/v1", api_key_env="FAKE_HF_TOKEN"
    )
    local = ProviderConfig(type="ollama", base_url=fake.base_url)
    config = MarieConfig(providers={"hf": hub, "ollama": local}, routing=NO_RETRIES)
    async with running_service(settings_for_tests(), config=config) as service:
        # No `hf/` prefix: the name is no listed model, but it is shaped like a
        # hub id and one Hugging Face provider is configured.
        chunks, error = await stream_outcome(
            service.stub.StreamChatCompletion(chat("meta-llama/Llama-3.1-8B-Instruct:fastest"))
        )
        cheapest, _ = await stream_outcome(
            service.stub.StreamChatCompletion(chat("meta-llama/Llama-3.1-8B-Instruct:cheapest"))
        )
        # Bare names that a listing holds still go where they are listed.
        local_chunks, local_error = await stream_outcome(
            service.stub.StreamChatCompletion(chat("llama3.2:latest"))
        )
        # A hub id the router does not know is its NOT_FOUND, not a guess elsewhere.
        _, unknown = await stream_outcome(
            service.stub.StreamChatCompletion(chat("nobody/no-such-model:fastest"))
        )

    assert error is None and local_error is None
    assert text_of(chunks) == "Hi from the hub" == text_of(cheapest)
    assert chunks[0].model == "hf/meta-llama/Llama-3.1-8B-Instruct:fastest"
    sent = [r.body["model"] for r in hf.requests_to("/v1/chat/completions")]
    assert sent[:2] == [
        "meta-llama/Llama-3.1-8B-Instruct:fastest",
        "meta-llama/Llama-3.1-8B-Instruct:cheapest",
    ]
    assert local_chunks[0].model == "ollama/llama3.2:latest"
    assert unknown is not None and unknown.code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------


async def test_anthropic_streams_with_system_lifted_and_max_tokens_defaulted(
    anthropic_service: Service, claude: FakeAnthropic
) -> None:
    request = chat(
        "claude/claude-fake",
        pb.ChatMessage(role=pb.ROLE_SYSTEM, content="Be brief."),
        user("hello"),
        user="someone",
    )
    chunks, error = await stream_outcome(anthropic_service.stub.StreamChatCompletion(request))

    assert error is None
    assert text_of(chunks) == "Bonjour from Claude"
    assert chunks[0].role == pb.ROLE_ASSISTANT
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens > 0
    [sent] = claude.requests_to("/v1/messages")
    assert sent.headers["x-api-key"] == claude.api_key
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body["system"] == "Be brief."
    assert sent.body["max_tokens"] == 4096
    assert sent.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}
    ]
    assert sent.body["metadata"] == {"user_id": "someone"}


async def test_anthropic_tool_use_streams_as_tool_call_deltas(anthropic_service: Service) -> None:
    request = chat("claude/claude-tools", tools=[WEATHER_TOOL])
    chunks, error = await stream_outcome(anthropic_service.stub.StreamChatCompletion(request))

    assert error is None
    assert calls_of(chunks) == {
        0: {"id": "toolu_fake0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    }
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_anthropic_tool_results_and_images_become_content_blocks(
    anthropic_service: Service, claude: FakeAnthropic
) -> None:
    history = [
        pb.ChatMessage(
            role=pb.ROLE_USER,
            parts=[
                pb.ContentPart(text="what is this?"),
                pb.ContentPart(image_url=pb.ImageUrl(url="data:image/png;base64,AAAA")),
            ],
        ),
        pb.ChatMessage(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[
                pb.ToolCall(
                    id="toolu_1",
                    function=pb.FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
                )
            ],
        ),
        pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="toolu_1", content="sunny"),
    ]
    request = chat("claude/claude-fake", *history, tools=[WEATHER_TOOL])
    await stream_outcome(anthropic_service.stub.StreamChatCompletion(request))

    [sent] = claude.requests_to("/v1/messages")
    assert sent.body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    assert sent.body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": {"type": "object"},
            "description": "Weather in a city",
        }
    ]


@pytest.mark.parametrize(
    ("cue", "code", "reason"),
    [
        (Cue.status_error(401), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_AUTH_FAILED"),
        (
            Cue.status_error(429, retry_after="3"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPSTREAM_RATE_LIMITED",
        ),
        (Cue.status_error(529), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
    ],
)
async def test_anthropic_upstream_statuses_map_to_the_error_table(
    anthropic_service: Service, claude: FakeAnthropic, cue: Cue, code: grpc.StatusCode, reason: str
) -> None:
    claude.fail_next(cue)
    _, error = await stream_outcome(
        anthropic_service.stub.StreamChatCompletion(chat("claude/claude-fake"))
    )

    assert error is not None
    assert (error.code, error.reason) == (code, reason)


async def test_anthropic_lists_models_and_details(anthropic_service: Service) -> None:
    reply = await anthropic_service.stub.ListModels(pb.ListModelsRequest())
    model = await anthropic_service.stub.GetModel(pb.GetModelRequest(model="claude/claude-fake"))
    missing = await rpc_error(
        anthropic_service.stub.GetModel(pb.GetModelRequest(model="claude/nope"))
    )

    assert [m.id for m in reply.models] == [
        "claude/claude-endless",
        "claude/claude-fake",
        "claude/claude-tools",
    ]
    assert model.model.description == "Claude Fake"
    assert model.model.details_loaded
    assert pb.MODEL_CAPABILITY_TOOLS in model.model.capabilities
    assert missing.reason == "MODEL_NOT_FOUND"


async def test_anthropic_cancelled_call_closes_the_upstream_stream(
    anthropic_service: Service, claude: FakeAnthropic
) -> None:
    call = anthropic_service.stub.StreamChatCompletion(chat("claude/claude-endless"))
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    call.cancel()

    assert await asyncio.to_thread(claude.wait_for_disconnect, 1)


async def test_anthropic_has_no_embeddings(anthropic_service: Service) -> None:
    error = await rpc_error(
        anthropic_service.stub.CreateEmbeddings(
            pb.CreateEmbeddingsRequest(model="claude/claude-fake", inputs=["x"])
        )
    )

    assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "model")


async def test_an_unreachable_cloud_provider_is_unavailable_without_its_address() -> None:
    dead = closed_port_url()
    entry = ProviderConfig(type="openai", base_url=f"{dead}/v1")
    async with running_service(
        settings_for_tests(), config=one_provider("local", entry)
    ) as service:
        _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())

    assert error is not None
    assert error.message == "local is not reachable: connection refused"
    [provider] = health.providers
    assert provider.status == pb.HEALTH_STATUS_ERROR
    assert provider.error == "local is not reachable: connection refused"


async def test_hf_with_a_token_but_the_router_down_still_lists_the_curated_models() -> None:
    dead = closed_port_url()
    entry = ProviderConfig(type="huggingface", base_url=f"{dead}/v1", api_key_env="FAKE_HF_TOKEN")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAKE_HF_TOKEN", "hf_x")
        async with running_service(
            settings_for_tests(), config=one_provider("hf", entry)
        ) as service:
            models = await service.stub.ListModels(pb.ListModelsRequest())
            health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())

    assert len(models.models) == 5
    assert all(m.metadata["curated"] == "true" for m in models.models)
    [provider] = health.providers
    assert provider.status == pb.HEALTH_STATUS_ERROR
    assert provider.error == "hf is not reachable: connection refused"


async def test_health_answers_from_memory_while_an_upstream_hangs() -> None:
    # A listening socket nobody accepts from: connections open, nothing answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    entry = ProviderConfig(type="openai", base_url=url)
    config = MarieConfig(
        providers={"silent": entry}, routing=RoutingConfig(health_interval_seconds=0.1)
    )
    # Probes of 5 s, running back to back: a health call that waited on one
    # would take seconds; one served from memory takes milliseconds. The wide
    # gap keeps this a test of behaviour, not of the machine's speed.
    settings = settings_for_tests().model_copy(update={"health_timeout_seconds": 5})
    try:
        async with running_service(settings, config=config) as service:
            timings = []
            for _ in range(5):
                started = time.monotonic()
                reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())
                timings.append(time.monotonic() - started)
                await asyncio.sleep(0.1)
    finally:
        silent.close()

    # Each probe takes the whole 5 s probe timeout; no health call waited for one.
    assert max(timings) < 2.5
    [provider] = reply.providers
    assert provider.status == pb.HEALTH_STATUS_ERROR
    assert provider.error == "silent did not answer in time"


async def test_a_models_allow_list_limits_listing_and_chat(oai: FakeOpenAI) -> None:
    entry = ProviderConfig(
        type="openai", base_url=f"{oai.base_url}/v1", api_key_env=KEY_ENV, models=("gpt-fake",)
    )
    async with running_service(settings_for_tests(), config=one_provider("oai", entry)) as service:
        listed = await service.stub.ListModels(pb.ListModelsRequest())
        _, refused = await stream_outcome(service.stub.StreamChatCompletion(chat("oai/tooly")))
        chunks, error = await stream_outcome(
            service.stub.StreamChatCompletion(chat("oai/gpt-fake"))
        )

    assert [m.id for m in listed.models] == ["oai/gpt-fake"]
    assert refused is not None and refused.reason == "MODEL_NOT_FOUND"
    assert error is None and text_of(chunks) == "Hello there, friend"
    assert [r.body["model"] for r in oai.requests_to("/v1/chat/completions")] == ["gpt-fake"]


async def test_openai_whole_replies_are_asked_for_whole(
    openai_service: Service, oai: FakeOpenAI
) -> None:
    request = chat("oai/tooly", tools=[WEATHER_TOOL], aggregate=True)
    chunks, error = await stream_outcome(openai_service.stub.StreamChatCompletion(request))

    assert error is None
    [chunk] = chunks
    assert chunk.role == pb.ROLE_ASSISTANT
    assert calls_of(chunks) == {
        0: {"id": "call_fake0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    }
    assert chunk.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert chunk.usage.prompt_tokens == 2
    [sent] = oai.requests_to("/v1/chat/completions")
    # Usage comes with a whole reply even from servers that ignore stream_options.
    assert sent.body["stream"] is False
    assert "stream_options" not in sent.body
