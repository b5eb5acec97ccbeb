"""Translation between Ollama's JSON and Marie's messages, without a network."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_providers.errors import UpstreamProtocolError, UpstreamStatusError
from marie_providers.ollama.translate import (
    ChatStreamTranslator,
    chat_payload,
    model_from_listing,
    model_from_show,
)
from marie_providers.upstream.model_facts import human_size


def request(*messages: pb.ChatMessage, **fields: Any) -> pb.StreamChatCompletionRequest:
    return pb.StreamChatCompletionRequest(
        model="ollama/m", messages=list(messages) or [pb.ChatMessage(role=pb.ROLE_USER)], **fields
    )


def translator() -> ChatStreamTranslator:
    return ChatStreamTranslator(
        completion_id="chatcmpl-1", model_id="ollama/m", provider="ollama", created=1700000000
    )


def line(content: str = "", *, done: bool = False, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": content}, "done": done, **extra}


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, ""),
        (512, "512B"),
        (1_500, "1.5KB"),
        (274_302_450, "274.3MB"),
        (2_019_393_189, "2.0GB"),
        (999_960_000, "1.0GB"),
        (40_000_000_000_000, "40.0TB"),
    ],
)
def test_human_size_uses_decimal_units_with_one_decimal(size: int, shown: str) -> None:
    assert human_size(size) == shown


def test_a_listing_entry_without_a_name_is_skipped() -> None:
    assert model_from_listing({"size": 5}, "ollama") is None


def test_a_listing_entry_with_a_bad_timestamp_has_no_modified_time() -> None:
    info = model_from_listing({"name": "m:latest", "modified_at": "yesterday"}, "ollama")

    assert info is not None
    assert not info.HasField("modified_time")
    assert "modified_at" not in info.metadata


def test_show_maps_every_known_capability() -> None:
    body = {
        "details": {"family": "llama"},
        "model_info": {"general.architecture": "mllama", "mllama.context_length": 8192},
        "capabilities": ["completion", "tools", "vision", "embedding", "thinking"],
    }

    info = model_from_show(body, "m:latest", "ollama")

    assert info.context_length == 8192
    assert list(info.capabilities) == [
        pb.MODEL_CAPABILITY_CHAT,
        pb.MODEL_CAPABILITY_COMPLETION,
        pb.MODEL_CAPABILITY_EMBEDDINGS,
        pb.MODEL_CAPABILITY_TOOLS,
        pb.MODEL_CAPABILITY_VISION,
    ]
    assert info.details_loaded


def test_show_without_model_info_leaves_context_length_unknown() -> None:
    info = model_from_show({"capabilities": ["completion"]}, "m", "ollama")

    assert info.context_length == 0


# ---------------------------------------------------------------------------
# Chat requests
# ---------------------------------------------------------------------------


def test_payload_streams_and_names_the_providers_own_model() -> None:
    payload = chat_payload(request(pb.ChatMessage(role=pb.ROLE_USER, content="hi")), "m:latest")

    assert payload == {
        "model": "m:latest",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }


def test_developer_messages_become_system_messages() -> None:
    payload = chat_payload(request(pb.ChatMessage(role=pb.ROLE_DEVELOPER, content="x")), "m")

    assert payload["messages"] == [{"role": "system", "content": "x"}]


def test_text_parts_are_joined_and_images_collected_in_order() -> None:
    message = pb.ChatMessage(
        role=pb.ROLE_USER,
        parts=[
            pb.ContentPart(text="first"),
            pb.ContentPart(image_url=pb.ImageUrl(url="data:image/png;base64,AAAA")),
            pb.ContentPart(text="second"),
            pb.ContentPart(image_url=pb.ImageUrl(url="data:image/jpeg;base64,BBBB")),
        ],
    )

    payload = chat_payload(request(message), "m")

    assert payload["messages"] == [
        {"role": "user", "content": "first\nsecond", "images": ["AAAA", "BBBB"]}
    ]


@pytest.mark.parametrize(
    "url", ["http://x.test/a.png", "data:image/svg+xml,<svg/>", "data:image/png;base64,", "x"]
)
def test_images_that_are_not_base64_data_urls_are_invalid(url: str) -> None:
    message = pb.ChatMessage(
        role=pb.ROLE_USER, parts=[pb.ContentPart(image_url=pb.ImageUrl(url=url))]
    )

    with pytest.raises(ServiceError) as info:
        chat_payload(request(message), "m")

    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.metadata["field"] == "messages[0].parts[0].image_url.url"


def test_tool_call_arguments_that_are_not_a_json_object_are_invalid() -> None:
    call = pb.ToolCall(id="c1", function=pb.FunctionCall(name="f", arguments="[1, 2]"))
    message = pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call])

    with pytest.raises(ServiceError) as info:
        chat_payload(request(message), "m")

    assert info.value.metadata["field"] == "messages[0].tool_calls[0].function.arguments"


def test_empty_tool_call_arguments_become_an_empty_object() -> None:
    call = pb.ToolCall(id="c1", function=pb.FunctionCall(name="f"))
    message = pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call])

    payload = chat_payload(request(message), "m")

    assert payload["messages"][0]["tool_calls"] == [{"function": {"name": "f", "arguments": {}}}]


def test_a_tool_result_for_an_unknown_call_has_no_tool_name() -> None:
    message = pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="missing", content="42")

    payload = chat_payload(request(message), "m")

    assert payload["messages"] == [{"role": "tool", "content": "42"}]


def test_schema_numbers_stay_fractional_when_they_are() -> None:
    schema = struct_pb2.Struct()
    schema.update({"type": "number", "minimum": 0.5, "maximum": 10})
    response_format = pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema
    )

    payload = chat_payload(request(response_format=response_format), "m")

    assert payload["format"] == {"type": "number", "minimum": 0.5, "maximum": 10}
    assert isinstance(payload["format"]["maximum"], int)


def test_text_response_format_sends_no_format() -> None:
    response_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)

    assert "format" not in chat_payload(request(response_format=response_format), "m")


def test_tool_choice_required_still_offers_every_tool() -> None:
    tools = [pb.Tool(function=pb.FunctionDefinition(name=n)) for n in ("a", "b")]

    payload = chat_payload(
        request(tools=tools, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)), "m"
    )

    assert [t["function"]["name"] for t in payload["tools"]] == ["a", "b"]


# ---------------------------------------------------------------------------
# Chat streams
# ---------------------------------------------------------------------------


def test_the_first_line_gets_the_role_even_when_empty() -> None:
    stream = translator()

    first = stream.translate(line(""))

    assert first is not None
    assert first.role == pb.ROLE_ASSISTANT
    assert first.content == ""


def test_later_empty_lines_produce_no_chunk() -> None:
    stream = translator()
    stream.translate(line("Hi"))

    assert stream.translate(line("")) is None


def test_the_done_line_finishes_without_usage_when_ollama_reports_none() -> None:
    stream = translator()
    stream.translate(line("Hi"))

    last = stream.translate(line(done=True, done_reason="stop"))

    assert last is not None
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert not last.HasField("usage")
    assert stream.finished


def test_usage_counts_a_missing_prompt_count_as_zero() -> None:
    last = translator().translate(line(done=True, eval_count=4))

    assert last is not None
    assert last.usage == pb.Usage(prompt_tokens=0, completion_tokens=4, total_tokens=4)


def test_each_tool_call_gets_the_next_index_and_its_own_id() -> None:
    stream = translator()
    calls = [
        {"function": {"name": "a", "arguments": {"x": 1}}},
        {"function": {"name": "b", "arguments": {}}},
    ]

    chunk = stream.translate({"message": {"content": "", "tool_calls": calls}, "done": False})
    later = stream.translate(
        {"message": {"tool_calls": [{"function": {"name": "c"}}]}, "done": False}
    )

    assert chunk is not None and later is not None
    deltas = [*chunk.tool_calls, *later.tool_calls]
    assert [(d.index, d.name, d.arguments) for d in deltas] == [
        (0, "a", '{"x":1}'),
        (1, "b", "{}"),
        (2, "c", "{}"),
    ]
    assert len({d.id for d in deltas}) == 3


def test_an_error_line_raises_the_upstream_message() -> None:
    with pytest.raises(UpstreamStatusError) as info:
        translator().translate({"error": "out of memory"})

    assert info.value.message == "out of memory"


@pytest.mark.parametrize(
    "bad",
    [
        {"message": "text", "done": False},
        {"message": {"content": 5}, "done": False},
        {"message": {"tool_calls": {"function": {}}}, "done": False},
        {"message": {"tool_calls": [{"function": {"arguments": {}}}]}, "done": False},
    ],
)
def test_lines_of_the_wrong_shape_are_protocol_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(UpstreamProtocolError):
        translator().translate(bad)
