"""Translation details of the OpenAI-compatible and Anthropic providers, without I/O."""

from __future__ import annotations

import orjson
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_providers.anthropic.translate import (
    JSON_INSTRUCTION,
    MessageStreamTranslator,
    messages_payload,
)
from marie_providers.errors import UpstreamStatusError
from marie_providers.openai_compatible.translate import ChatStreamTranslator, chat_payload
from providers_testkit import chat, user


def test_anthropic_refuses_temperatures_above_one_naming_the_field() -> None:
    request = chat("m", sampling=pb.SamplingParameters(temperature=1.5))

    with pytest.raises(ServiceError) as caught:
        messages_payload(request, "m")

    assert caught.value.metadata["field"] == "sampling.temperature"


def test_anthropic_json_formats_become_a_system_instruction() -> None:
    schema = '{"type":"object","properties":{"b":{},"a":{}}}'
    request = chat(
        "m",
        pb.ChatMessage(role=pb.ROLE_SYSTEM, content="Be brief."),
        user("hi"),
        response_format=pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema_json=schema
        ),
    )

    payload = messages_payload(request, "m")

    assert (
        payload["system"]
        == f"Be brief.\n\n{JSON_INSTRUCTION} It must follow this JSON Schema: {schema}"
    )


def test_anthropic_needs_a_user_or_assistant_message() -> None:
    request = chat("m", pb.ChatMessage(role=pb.ROLE_SYSTEM, content="only instructions"))

    with pytest.raises(ServiceError) as caught:
        messages_payload(request, "m")

    assert caught.value.metadata["field"] == "messages"


def test_anthropic_stream_error_event_is_an_upstream_error() -> None:
    translator = MessageStreamTranslator(completion_id="c", model_id="a/m", provider="a", created=1)
    event = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

    with pytest.raises(UpstreamStatusError, match="Overloaded"):
        translator.translate("error", orjson.dumps(event).decode())


def test_openai_tool_schemas_sent_as_text_keep_their_key_order() -> None:
    schema = '{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"string"}}}'
    request = chat(
        "m",
        tools=[pb.Tool(function=pb.FunctionDefinition(name="f", parameters_json=schema))],
    )

    body = orjson.dumps(chat_payload(request, "m"))

    assert b'"parameters":' + schema.encode() in body


def test_openai_usage_after_the_finish_joins_the_last_chunk() -> None:
    translator = ChatStreamTranslator(completion_id="c", model_id="o/m", provider="o", created=1)
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    ]
    chunks = [c for e in events for c in translator.translate(orjson.dumps(e).decode())]
    chunks += translator.translate("[DONE]")

    assert [c.content for c in chunks] == ["Hi", ""]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.total_tokens == 4
    assert translator.done
