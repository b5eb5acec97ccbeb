"""ProviderService over real gRPC against a fake Ollama speaking Ollama's real HTTP API."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import struct_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_providers.settings import ProvidersSettings
from providers_testkit import (
    Service,
    chat,
    closed_port_url,
    ollama_providers,
    running_service,
    stream_outcome,
    user,
)

from tests.fakes.ollama import FakeModel, FakeOllama, fake_embedding
from tests.grpc_testing import rpc_error

LLAMA = "ollama/llama3.2:latest"
WEATHER_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}


def weather_tool() -> pb.Tool:
    parameters = struct_pb2.Struct()
    parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    return pb.Tool(
        type="function",
        function=pb.FunctionDefinition(
            name="get_weather", description="Weather by city", parameters=parameters
        ),
    )


def clock_tool() -> pb.Tool:
    return pb.Tool(function=pb.FunctionDefinition(name="get_time"))


# ---------------------------------------------------------------------------
# ListProviders and GetProviderHealth
# ---------------------------------------------------------------------------


async def test_list_providers_describes_the_configured_ollama(
    service: Service, fake: FakeOllama
) -> None:
    reply = await service.stub.ListProviders(pb.ListProvidersRequest())

    assert list(reply.providers) == [
        pb.Provider(
            name="ollama",
            kind="ollama",
            base_url=fake.base_url,
            supports_streaming=True,
            supports_embeddings=True,
        )
    ]


async def test_health_of_a_reachable_ollama_is_healthy_with_its_model_count(
    service: Service,
) -> None:
    reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="ollama"))

    [health] = reply.providers
    assert health.provider == "ollama"
    assert health.status == pb.HEALTH_STATUS_HEALTHY
    assert health.available
    assert health.models_count == 4
    assert health.latency_ms > 0
    assert health.HasField("check_time")
    assert not health.error


async def test_health_of_an_unreachable_ollama_is_error_naming_the_url(
    settings: ProvidersSettings,
) -> None:
    dead = closed_port_url()
    async with running_service(settings.model_copy(update={"ollama_base_url": dead})) as service:
        reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest())

    [health] = reply.providers
    assert health.status == pb.HEALTH_STATUS_ERROR
    assert not health.available
    assert health.error == "ollama is not reachable: connection refused"


async def test_health_of_an_unknown_provider_is_provider_not_found(service: Service) -> None:
    error = await rpc_error(
        service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="nope"))
    )

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "PROVIDER_NOT_FOUND"
    assert error.domain == "marie.providers"


# ---------------------------------------------------------------------------
# ListModels
# ---------------------------------------------------------------------------


async def test_list_models_maps_ollama_tags_to_model_info(service: Service) -> None:
    reply = await service.stub.ListModels(pb.ListModelsRequest())

    assert [m.id for m in reply.models] == [
        "ollama/gemma3:1b",
        "ollama/llama3.2:latest",
        "ollama/nomic-embed-text:latest",
        "ollama/qwen2.5:0.5b",
    ]
    llama = reply.models[1]
    assert llama.name == "llama3.2:latest"
    assert llama.provider == "ollama"
    assert llama.parameters == "3.2B"
    assert llama.quantization == "Q4_K_M"
    assert llama.size_bytes == 2_019_393_189
    assert llama.size_label == "2.0GB"
    assert llama.family == "llama"
    assert llama.format == "gguf"
    assert llama.metadata["digest"] == (
        "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
    )
    assert llama.metadata["families"] == "llama"
    assert llama.metadata["modified_at"] == "2025-03-14T09:26:53.589793+01:00"
    assert llama.modified_time.ToDatetime(tzinfo=UTC) == datetime(
        2025, 3, 14, 8, 26, 53, 589793, tzinfo=UTC
    )
    # A plain listing is useful: what only /api/show tells is loaded too.
    assert llama.details_loaded
    assert llama.context_length == 131072
    assert pb.MODEL_CAPABILITY_CHAT in llama.capabilities
    assert pb.MODEL_CAPABILITY_TOOLS in llama.capabilities
    assert not reply.provider_errors


async def test_list_models_is_served_from_cache_on_the_second_call(
    service: Service, fake: FakeOllama
) -> None:
    first = await service.stub.ListModels(pb.ListModelsRequest(force_refresh=True))
    second = await service.stub.ListModels(pb.ListModelsRequest())

    assert second == first
    assert len(fake.requests_to("/api/tags")) == 1


async def test_the_health_round_at_start_warms_the_listing_cache(
    service: Service, fake: FakeOllama
) -> None:
    reply = await service.stub.ListModels(pb.ListModelsRequest())

    assert len(reply.models) == 4
    assert fake.requests_to("/api/tags") == []


async def test_list_models_with_force_refresh_asks_ollama_again(
    service: Service, fake: FakeOllama
) -> None:
    await service.stub.ListModels(pb.ListModelsRequest())
    fake.add_model(FakeModel(name="phi3:mini", family="phi3"))

    reply = await service.stub.ListModels(pb.ListModelsRequest(force_refresh=True))

    assert "ollama/phi3:mini" in [m.id for m in reply.models]
    # The first call was served by the listing the start-up health round cached.
    assert len(fake.requests_to("/api/tags")) == 1


async def test_list_models_filtered_by_capability_loads_details(service: Service) -> None:
    reply = await service.stub.ListModels(
        pb.ListModelsRequest(capability=pb.MODEL_CAPABILITY_EMBEDDINGS)
    )

    [model] = reply.models
    assert model.id == "ollama/nomic-embed-text:latest"
    assert model.details_loaded
    assert list(model.capabilities) == [pb.MODEL_CAPABILITY_EMBEDDINGS]
    assert model.context_length == 2048


async def test_list_models_of_an_unreachable_ollama_is_unavailable(
    settings: ProvidersSettings,
) -> None:
    dead = closed_port_url()
    async with running_service(settings.model_copy(update={"ollama_base_url": dead})) as service:
        error = await rpc_error(service.stub.ListModels(pb.ListModelsRequest()))

    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "PROVIDER_UNAVAILABLE"
    # The address is the operator's business (it is in the log), not the caller's.
    assert dead not in error.message
    assert "url" not in error.metadata


async def test_list_models_reports_a_failing_provider_beside_the_others(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    dead = closed_port_url()
    providers = ollama_providers(ollama=fake.base_url, broken=dead)
    async with running_service(settings, providers) as service:
        reply = await service.stub.ListModels(pb.ListModelsRequest())

    assert {m.provider for m in reply.models} == {"ollama"}
    assert len(reply.models) == 4
    [failure] = reply.provider_errors
    assert failure.provider == "broken"
    assert failure.reason == "PROVIDER_UNAVAILABLE"
    assert failure.message == "broken is not reachable: connection refused"


# ---------------------------------------------------------------------------
# GetModel and SearchModels
# ---------------------------------------------------------------------------


async def test_get_model_returns_details_merged_with_the_listing(service: Service) -> None:
    reply = await service.stub.GetModel(pb.GetModelRequest(model=LLAMA))

    model = reply.model
    assert model.id == LLAMA
    assert model.details_loaded
    assert model.context_length == 131_072
    assert list(model.capabilities) == [
        pb.MODEL_CAPABILITY_CHAT,
        pb.MODEL_CAPABILITY_COMPLETION,
        pb.MODEL_CAPABILITY_TOOLS,
    ]
    assert model.size_bytes == 2_019_393_189
    assert model.metadata["digest"].startswith("a80c4f17")


async def test_get_model_resolves_a_bare_name_without_tag(service: Service) -> None:
    reply = await service.stub.GetModel(pb.GetModelRequest(model="llama3.2"))

    assert reply.model.id == LLAMA


async def test_get_model_of_an_unknown_model_is_model_not_found(service: Service) -> None:
    error = await rpc_error(service.stub.GetModel(pb.GetModelRequest(model="ollama/nope:7b")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert error.domain == "marie.providers"
    assert "nope:7b" in error.message


async def test_get_model_of_an_unknown_bare_name_is_model_not_found(service: Service) -> None:
    error = await rpc_error(service.stub.GetModel(pb.GetModelRequest(model="nope")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"


async def test_search_ranks_exact_name_then_prefix_then_substring(
    service: Service, fake: FakeOllama
) -> None:
    fake.add_model(FakeModel(name="tinyllama3.2:1b"))
    fake.add_model(FakeModel(name="llama3.2-vision:11b", capabilities=["completion", "vision"]))
    # The health round at start cached the listing from before these were added.
    await service.stub.ListModels(pb.ListModelsRequest(force_refresh=True))

    reply = await service.stub.SearchModels(pb.SearchModelsRequest(query="LLAMA3.2"))

    assert [m.name for m in reply.models] == [
        "llama3.2:latest",
        "llama3.2-vision:11b",
        "tinyllama3.2:1b",
    ]


async def test_search_requires_every_term_and_matches_capabilities(service: Service) -> None:
    reply = await service.stub.SearchModels(pb.SearchModelsRequest(query="qwen tools"))

    assert [m.id for m in reply.models] == ["ollama/qwen2.5:0.5b"]


async def test_search_honours_the_limit(service: Service) -> None:
    reply = await service.stub.SearchModels(pb.SearchModelsRequest(query="ollama", limit=2))

    assert len(reply.models) == 2


# ---------------------------------------------------------------------------
# StreamChatCompletion: the happy path
# ---------------------------------------------------------------------------


async def test_chat_stream_content_assembles_to_the_upstream_reply(
    service: Service, fake: FakeOllama
) -> None:
    # Lines that arrive apart stream apart (lines read together may be merged).
    fake.set_model(
        "llama3.2:latest", reply="The sky is blue, mostly because of Rayleigh.", chunk_delay=0.01
    )

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert error is None
    assert "".join(c.content for c in chunks) == "The sky is blue, mostly because of Rayleigh."
    assert len(chunks) > 3


async def test_an_aggregate_request_gets_the_whole_reply_in_one_chunk(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="One two three four.", chunk_delay=0.01, eval_count=4)

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, aggregate=True))
    )

    assert error is None
    (chunk,) = chunks
    assert (chunk.role, chunk.content) == (pb.ROLE_ASSISTANT, "One two three four.")
    assert chunk.finish_reason == pb.FINISH_REASON_STOP
    assert chunk.usage.completion_tokens == 4


async def test_create_chat_completion_answers_the_whole_reply_at_once(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="One two three four.", chunk_delay=0.01, eval_count=4)

    reply = await service.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(chat=chat(LLAMA))
    )

    (chunk,) = reply.chunks
    assert (chunk.role, chunk.content) == (pb.ROLE_ASSISTANT, "One two three four.")
    assert chunk.finish_reason == pb.FINISH_REASON_STOP
    assert chunk.usage.completion_tokens == 4
    assert chunk.model == "ollama/llama3.2:latest"
    (sent,) = fake.chat_requests
    assert sent.body is not None and sent.body["messages"][-1]["role"] == "user"


async def test_create_chat_completion_keeps_tool_calls_apart(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model(
        "llama3.2:latest",
        tool_calls=[{"function": {"name": "lookup", "arguments": {"q": "x"}}}],
    )

    reply = await service.stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(chat=chat(LLAMA))
    )

    assert [c.tool_calls[0].name for c in reply.chunks if c.tool_calls] == ["lookup"]
    assert reply.chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_create_chat_completion_errors_as_the_stream_does(service: Service) -> None:
    missing = await rpc_error(service.stub.CreateChatCompletion(pb.CreateChatCompletionRequest()))
    assert (missing.code, missing.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert missing.metadata["field"] == "chat"

    unknown = await rpc_error(
        service.stub.CreateChatCompletion(
            pb.CreateChatCompletionRequest(chat=chat("ollama/nope:latest"))
        )
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")

    not_allowed = await rpc_error(
        service.stub.CreateChatCompletion(
            pb.CreateChatCompletionRequest(chat=chat(LLAMA)),
            metadata=(("x-marie-allowed-models", "ollama/qwen*"),),
        )
    )
    assert (not_allowed.code, not_allowed.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
    )


async def test_an_aggregate_request_keeps_tool_calls_in_their_own_chunk(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model(
        "llama3.2:latest",
        tool_calls=[{"function": {"name": "lookup", "arguments": {"q": "x"}}}],
    )

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, aggregate=True))
    )

    assert error is None
    with_calls = [c for c in chunks if c.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].tool_calls[0].name == "lookup"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_chat_stream_sends_the_role_on_the_first_chunk_only(service: Service) -> None:
    chunks, _ = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert chunks[0].role == pb.ROLE_ASSISTANT
    assert all(c.role == pb.ROLE_UNSPECIFIED for c in chunks[1:])


async def test_chat_stream_ends_with_finish_reason_and_usage(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", reply="Hi there!", prompt_eval_count=12, eval_count=3)

    chunks, _ = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage == pb.Usage(prompt_tokens=12, completion_tokens=3, total_tokens=15)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert all(not c.HasField("usage") for c in chunks[:-1])


async def test_chat_stream_reports_length_when_ollama_hit_the_token_limit(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", done_reason="length")

    chunks, _ = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_chat_stream_chunks_share_id_model_provider_and_created(service: Service) -> None:
    chunks, _ = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert {(c.model, c.provider, c.created) for c in chunks} == {
        (LLAMA, "ollama", chunks[0].created)
    }
    assert abs(chunks[0].created - datetime.now(UTC).timestamp()) < 60


async def test_chat_stream_keeps_a_completion_id_given_by_the_caller(service: Service) -> None:
    request = chat(LLAMA, completion_id="chatcmpl-from-gateway")

    chunks, _ = await stream_outcome(service.stub.StreamChatCompletion(request))

    assert {c.id for c in chunks} == {"chatcmpl-from-gateway"}


async def test_chat_stream_translates_ollama_tool_calls(service: Service, fake: FakeOllama) -> None:
    fake.set_model("llama3.2:latest", tool_calls=[WEATHER_CALL])
    request = chat(LLAMA, user("Weather in Paris?"), tools=[weather_tool()])

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(request))

    assert error is None
    [call] = [d for c in chunks for d in c.tool_calls]
    assert call.index == 0
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.name == "get_weather"
    assert call.arguments == '{"city":"Paris","days":2}'
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_chat_with_explicit_provider_does_not_list_models(
    service: Service, fake: FakeOllama
) -> None:
    await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert fake.requests_to("/api/tags") == []
    assert fake.chat_requests[-1].body["model"] == "llama3.2:latest"


async def test_chat_with_a_bare_name_resolves_to_the_latest_tag(
    service: Service, fake: FakeOllama
) -> None:
    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("llama3.2")))

    assert error is None
    assert chunks[0].model == LLAMA
    assert fake.chat_requests[-1].body["model"] == "llama3.2:latest"


async def test_chat_with_a_name_two_providers_serve_is_ambiguous(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    providers = ollama_providers(ollama=fake.base_url, local=fake.base_url)
    async with running_service(settings, providers) as service:
        _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("llama3.2")))

    assert error is not None
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "AMBIGUOUS_MODEL"
    assert "ollama/llama3.2:latest" in error.message
    assert "local/llama3.2:latest" in error.message


async def test_chat_with_a_bare_name_picks_the_only_provider_serving_it(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    with FakeOllama(models=[FakeModel(name="phi3:mini", reply="phi here")]) as other:
        providers = ollama_providers(ollama=fake.base_url, other=other.base_url)
        async with running_service(settings, providers) as service:
            chunks, error = await stream_outcome(
                service.stub.StreamChatCompletion(chat("phi3:mini"))
            )

    assert error is None
    assert chunks[0].model == "other/phi3:mini"
    assert "".join(c.content for c in chunks) == "phi here"


# ---------------------------------------------------------------------------
# StreamChatCompletion: what Ollama receives
# ---------------------------------------------------------------------------


async def test_chat_maps_sampling_parameters_to_ollama_options(
    service: Service, fake: FakeOllama
) -> None:
    sampling = pb.SamplingParameters(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        max_tokens=128,
        stop=["\n\n", "END"],
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
    )

    await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA, sampling=sampling)))

    body = fake.chat_requests[-1].body
    assert body["stream"] is True
    assert body["options"] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "num_predict": 128,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
    }


async def test_chat_sends_no_options_when_none_are_set(service: Service, fake: FakeOllama) -> None:
    await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert "options" not in fake.chat_requests[-1].body


async def test_chat_maps_json_object_format(service: Service, fake: FakeOllama) -> None:
    response_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)

    await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, response_format=response_format))
    )

    assert fake.chat_requests[-1].body["format"] == "json"


async def test_chat_sends_a_json_schema_as_the_format_with_integers_kept(
    service: Service, fake: FakeOllama
) -> None:
    schema = struct_pb2.Struct()
    schema.update({"type": "array", "items": {"type": "string"}, "maxItems": 3})
    response_format = pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="colors", json_schema=schema
    )

    await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, response_format=response_format))
    )

    sent = fake.chat_requests[-1].raw_body
    assert fake.chat_requests[-1].body["format"] == {
        "type": "array",
        "items": {"type": "string"},
        "maxItems": 3,
    }
    assert b'"maxItems":3,' in sent or b'"maxItems":3}' in sent


async def test_chat_sends_tools_in_ollama_shape(service: Service, fake: FakeOllama) -> None:
    await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, tools=[weather_tool(), clock_tool()]))
    )

    assert fake.chat_requests[-1].body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        },
    ]


async def test_chat_with_tool_choice_none_sends_no_tools(
    service: Service, fake: FakeOllama
) -> None:
    request = chat(
        LLAMA,
        tools=[weather_tool()],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE),
    )

    await stream_outcome(service.stub.StreamChatCompletion(request))

    assert "tools" not in fake.chat_requests[-1].body


async def test_chat_with_tool_choice_function_sends_only_that_tool(
    service: Service, fake: FakeOllama
) -> None:
    request = chat(
        LLAMA,
        tools=[weather_tool(), clock_tool()],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name="get_time"),
    )

    await stream_outcome(service.stub.StreamChatCompletion(request))

    assert [t["function"]["name"] for t in fake.chat_requests[-1].body["tools"]] == ["get_time"]


async def test_chat_sends_a_tool_round_trip_in_ollama_shape(
    service: Service, fake: FakeOllama
) -> None:
    messages = [
        pb.ChatMessage(role=pb.ROLE_DEVELOPER, content="Be brief."),
        user("Weather in Paris?"),
        pb.ChatMessage(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[
                pb.ToolCall(
                    id="call_1",
                    type="function",
                    function=pb.FunctionCall(name="get_weather", arguments='{"city": "Paris"}'),
                )
            ],
        ),
        pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="call_1", content="Sunny, 21C"),
    ]

    _, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA, *messages, tools=[weather_tool()]))
    )

    assert error is None
    assert fake.chat_requests[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "Sunny, 21C", "tool_name": "get_weather"},
    ]


async def test_chat_sends_data_url_images_as_base64(service: Service, fake: FakeOllama) -> None:
    message = pb.ChatMessage(
        role=pb.ROLE_USER,
        parts=[
            pb.ContentPart(text="What is this?"),
            pb.ContentPart(image_url=pb.ImageUrl(url="data:image/png;base64,iVBORw0KGgo=")),
        ],
    )

    await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA, message)))

    assert fake.chat_requests[-1].body["messages"] == [
        {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}
    ]


# ---------------------------------------------------------------------------
# StreamChatCompletion: failures and cancellation
# ---------------------------------------------------------------------------


async def test_chat_error_mid_stream_ends_the_call_after_the_chunks_sent(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model(
        "llama3.2:latest", reply="one two three four", error_after=2, error_message="GPU fell over"
    )

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert "".join(c.content for c in chunks) == "one two"
    assert error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_ERROR"
    assert "GPU fell over" in error.message


async def test_chat_with_ollama_down_is_unavailable_without_its_url(
    settings: ProvidersSettings,
) -> None:
    dead = closed_port_url()
    async with running_service(settings.model_copy(update={"ollama_base_url": dead})) as service:
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert chunks == []
    assert error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "PROVIDER_UNAVAILABLE"
    assert error.message == "ollama is not reachable: connection refused"
    assert "url" not in error.metadata


async def test_chat_with_an_unknown_model_is_model_not_found(service: Service) -> None:
    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("ollama/nope:1b")))

    assert error is not None
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert "nope:1b" in error.message


async def test_chat_with_an_unknown_provider_is_provider_not_found(service: Service) -> None:
    request = chat("llama3.2:latest", provider="openai")

    _, error = await stream_outcome(service.stub.StreamChatCompletion(request))

    assert error is not None
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "PROVIDER_NOT_FOUND"


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST"),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        (500, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
        (503, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
    ],
)
async def test_chat_maps_an_upstream_error_status(
    service: Service,
    fake: FakeOllama,
    status: int,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    fake.set_model("llama3.2:latest", status_error=(status, "upstream says no"))

    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert error is not None
    assert (error.code, error.reason) == (code, reason)
    assert error.metadata["upstream_status"] == str(status)
    assert "upstream says no" in error.message


async def test_chat_with_a_silent_upstream_times_out(
    settings: ProvidersSettings, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", first_byte_delay=2.0)
    quick = settings.model_copy(update={"read_timeout_seconds": 0.2})
    async with running_service(quick) as service:
        _, error = await stream_outcome(service.stub.StreamChatCompletion(chat(LLAMA)))

    assert error is not None
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "UPSTREAM_TIMEOUT"


async def test_cancelling_a_chat_stream_closes_the_upstream_request(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", endless=True, chunk_delay=0.01)
    call = service.stub.StreamChatCompletion(chat(LLAMA))
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break

    call.cancel()

    assert await fake.wait_for_disconnect_async(timeout=5)
    assert await fake.wait_for_active_streams_async(0, timeout=5)


async def test_a_passed_deadline_closes_the_upstream_request(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("llama3.2:latest", endless=True, chunk_delay=0.01)

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat(LLAMA), timeout=0.3)
    )

    assert chunks
    assert error is not None
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await fake.wait_for_disconnect_async(timeout=5)


# ---------------------------------------------------------------------------
# CreateEmbeddings
# ---------------------------------------------------------------------------


async def test_embeddings_return_one_vector_per_input_in_order(service: Service) -> None:
    request = pb.CreateEmbeddingsRequest(
        model="ollama/nomic-embed-text:latest", inputs=["hello world", "good night moon"]
    )

    reply = await service.stub.CreateEmbeddings(request)

    assert reply.model == "ollama/nomic-embed-text:latest"
    assert [e.index for e in reply.embeddings] == [0, 1]
    for embedding, text in zip(reply.embeddings, request.inputs, strict=True):
        assert list(embedding.values) == pytest.approx(fake_embedding(text, 768), abs=1e-6)
    assert reply.usage == pb.Usage(prompt_tokens=5, total_tokens=5)


async def test_embeddings_truncated_to_dimensions_are_unit_length(service: Service) -> None:
    request = pb.CreateEmbeddingsRequest(
        model="nomic-embed-text", inputs=["hello world"], dimensions=64
    )

    reply = await service.stub.CreateEmbeddings(request)

    [embedding] = reply.embeddings
    values = list(embedding.values)
    assert len(values) == 64
    assert math.sqrt(sum(v * v for v in values)) == pytest.approx(1.0, abs=1e-5)
    full = fake_embedding("hello world", 768)[:64]
    scale = values[0] / full[0]
    assert values == pytest.approx([v * scale for v in full], abs=1e-5)


async def test_embeddings_of_an_unknown_model_are_model_not_found(service: Service) -> None:
    request = pb.CreateEmbeddingsRequest(model="ollama/nope", inputs=["x"])

    error = await rpc_error(service.stub.CreateEmbeddings(request))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"


# ---------------------------------------------------------------------------
# INVALID_ARGUMENT
# ---------------------------------------------------------------------------


def _sampling(**fields: float | int | list[str]) -> pb.SamplingParameters:
    return pb.SamplingParameters(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (chat(""), "model"),
        (pb.StreamChatCompletionRequest(model=LLAMA), "messages"),
        (chat(LLAMA, pb.ChatMessage(content="hi")), "messages[0].role"),
        (chat(LLAMA, sampling=_sampling(temperature=2.5)), "sampling.temperature"),
        (chat(LLAMA, sampling=_sampling(temperature=-0.1)), "sampling.temperature"),
        (chat(LLAMA, sampling=_sampling(top_p=1.5)), "sampling.top_p"),
        (chat(LLAMA, sampling=_sampling(max_tokens=0)), "sampling.max_tokens"),
        (chat(LLAMA, sampling=_sampling(stop=["a", "b", "c", "d", "e"])), "sampling.stop"),
        (
            chat(LLAMA, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION)),
            "tool_choice",
        ),
        (
            chat(
                LLAMA,
                pb.ChatMessage(
                    role=pb.ROLE_USER,
                    parts=[pb.ContentPart(image_url=pb.ImageUrl(url="https://x.test/cat.png"))],
                ),
            ),
            "messages[0].parts[0].image_url.url",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_invalid_chat_requests_are_rejected_naming_the_field(
    service: Service, fake: FakeOllama, request_: pb.StreamChatCompletionRequest, field: str
) -> None:
    _, error = await stream_outcome(service.stub.StreamChatCompletion(request_))

    assert error is not None
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.domain == "marie.providers"
    assert error.metadata["field"] == field
    assert fake.chat_requests == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.CreateEmbeddingsRequest(inputs=["x"]), "model"),
        (pb.CreateEmbeddingsRequest(model="nomic-embed-text"), "inputs"),
        (pb.CreateEmbeddingsRequest(model="nomic-embed-text", inputs=["x", ""]), "inputs[1]"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_invalid_embedding_requests_are_rejected_naming_the_field(
    service: Service, request_: pb.CreateEmbeddingsRequest, field: str
) -> None:
    error = await rpc_error(service.stub.CreateEmbeddings(request_))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == field


async def test_get_model_without_a_model_is_invalid(service: Service) -> None:
    error = await rpc_error(service.stub.GetModel(pb.GetModelRequest()))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == "model"


async def test_search_without_a_query_is_invalid(service: Service) -> None:
    error = await rpc_error(service.stub.SearchModels(pb.SearchModelsRequest(query="  ")))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == "query"


async def test_a_listing_loads_details_and_says_which_are_pending(
    service: Service, fake: FakeOllama
) -> None:
    fake.set_model("gemma3:1b", show_error=(500, "failed to read the model's manifest"))
    reply = await service.stub.ListModels(pb.ListModelsRequest(force_refresh=True))
    by_name = {m.name: m for m in reply.models}
    # A failed details call leaves that model's details pending, and only its.
    assert not by_name["gemma3:1b"].details_loaded
    assert not by_name["gemma3:1b"].capabilities
    embedder = by_name["nomic-embed-text:latest"]
    assert embedder.details_loaded
    assert list(embedder.capabilities) == [pb.MODEL_CAPABILITY_EMBEDDINGS]
    assert embedder.context_length == 2048
    shows = len(fake.requests_to("/api/show"))
    # Details are cached like listings: a second listing asks only for what failed.
    await service.stub.ListModels(pb.ListModelsRequest())
    assert len(fake.requests_to("/api/show")) == shows + 1


async def test_a_text_completion_echoes_the_prompt_with_logprobs_of_the_generated_tokens(
    service: Service, fake: FakeOllama
) -> None:
    request = pb.StreamCompletionRequest(
        model="ollama/llama3.2:latest", prompt="Go on", echo=True, logprobs=2, aggregate=True
    )
    chunks = [c async for c in service.stub.StreamCompletion(request)]
    text = "".join(c.text for c in chunks)
    reply = "Hello from llama3.2:latest! You said: Go on"
    assert text == "Go on" + reply
    assert chunks[0].id.startswith("cmpl-")
    tokens = [t for c in chunks for t in c.logprobs]
    assert "".join(t.token for t in tokens) == reply
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens > 0
    sent = fake.generate_requests[-1].body
    assert sent["raw"] is True and sent["logprobs"] is True and sent["top_logprobs"] == 2


async def test_a_text_completion_without_a_prompt_is_invalid(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in service.stub.StreamCompletion(
            pb.StreamCompletionRequest(model="ollama/llama3.2:latest")
        ):
            pass
    assert ServiceError.from_rpc_error(caught.value).metadata["field"] == "prompt"


async def test_token_inputs_are_refused_by_ollama_naming_the_field(service: Service) -> None:
    request = pb.CreateEmbeddingsRequest(model="ollama/nomic-embed-text:latest")
    request.token_inputs.add(ids=[1, 2, 3])
    error = await rpc_error(service.stub.CreateEmbeddings(request))
    assert error.reason == "UNSUPPORTED_BY_PROVIDER"
    assert error.metadata["field"] == "token_inputs"
    assert "check_embedding_ctx_length=False" in error.message
