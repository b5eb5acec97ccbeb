"""Translation details of the OpenAI-compatible and Anthropic providers, without I/O."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError
from marie_providers.anthropic.translate import (
    JSON_INSTRUCTION,
    MessageStreamTranslator,
    extra_headers,
    messages_payload,
)
from marie_providers.errors import UpstreamStatusError
from marie_providers.openai_compatible.translate import ChatStreamTranslator, chat_payload
from marie_providers.upstream.chunks import ChunkMerger
from marie_providers.validation import check_chat_request
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


def _extras(request_json: str = "", **headers: str) -> pb.UpstreamExtras:
    return pb.UpstreamExtras(
        kind="anthropic", request_json=request_json, fields=["thinking"], headers=headers
    )


def test_anthropic_extras_replace_the_translated_fields() -> None:
    history = [{"role": "user", "content": [{"type": "document", "source": {"type": "text"}}]}]
    fields = {"thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": history}
    request = chat("m", user("hi"), upstream_extras=_extras(orjson.dumps(fields).decode()))

    payload = messages_payload(request, "claude-x")

    assert payload["thinking"] == fields["thinking"]
    assert payload["messages"] == history
    # What the caller may not change stays the translation's.
    assert payload["model"] == "claude-x" and payload["stream"] is True


@pytest.mark.parametrize("name", ["model", "stream", "max_tokens", "system"])
def test_anthropic_extras_cannot_set_what_marie_decides(name: str) -> None:
    request = chat("m", user("hi"), upstream_extras=_extras(orjson.dumps({name: 1}).decode()))

    with pytest.raises(ServiceError) as caught:
        messages_payload(request, "m")

    assert caught.value.metadata["field"] == f"upstream_extras.request_json.{name}"


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-api-key", "stolen"), ("anthropic-version", "2099-01-01"), ("anthropic-beta", "a\r\nx: y")],
)
def test_anthropic_extras_send_only_a_clean_beta_header(name: str, value: str) -> None:
    with pytest.raises(ServiceError) as caught:
        extra_headers(_extras(**{name: value}))

    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert extra_headers(_extras(**{"anthropic-beta": "web-search-2025-03-05"})) == {
        "anthropic-beta": "web-search-2025-03-05"
    }


@pytest.mark.parametrize(
    ("extras", "field"),
    [
        (pb.UpstreamExtras(request_json="{}"), "upstream_extras.kind"),
        (pb.UpstreamExtras(kind="anthropic", request_json="[1]"), "upstream_extras.request_json"),
    ],
)
def test_malformed_extras_are_invalid_arguments(extras: pb.UpstreamExtras, field: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_chat_request(chat("m", user("hi"), upstream_extras=extras))

    assert caught.value.metadata["field"] == field


def _translate(events: list[dict[str, object]]) -> list[pb.StreamChatCompletionResponse]:
    translator = MessageStreamTranslator(completion_id="c", model_id="a/m", provider="a", created=1)
    chunks = [translator.translate(str(e["type"]), orjson.dumps(e).decode()) for e in events]
    return [c for c in chunks if c is not None]


def _block(index: int, block: Mapping[str, object]) -> dict[str, object]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _delta(index: int, delta: Mapping[str, object]) -> dict[str, object]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def test_anthropic_thinking_becomes_reasoning_numbered_by_block() -> None:
    chunks = _translate(
        [
            {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
            _block(0, {"type": "thinking", "thinking": "", "signature": ""}),
            _delta(0, {"type": "thinking_delta", "thinking": "Hmm."}),
            _delta(0, {"type": "signature_delta", "signature": "c2ln"}),
            {"type": "content_block_stop", "index": 0},
            _block(1, {"type": "redacted_thinking", "data": "ZGF0YQ=="}),
            {"type": "content_block_stop", "index": 1},
            _block(2, {"type": "text", "text": ""}),
            _delta(2, {"type": "text_delta", "text": "42"}),
        ]
    )

    shown = [
        (c.block, c.reasoning.text, c.reasoning.signature, c.reasoning.redacted, c.content)
        for c in chunks[1:]
    ]
    assert shown == [
        (1, "", "", "", ""),
        (1, "Hmm.", "", "", ""),
        (1, "", "c2ln", "", ""),
        (2, "", "", "ZGF0YQ==", ""),
        (3, "", "", "", "42"),
    ]


def test_anthropic_server_blocks_come_as_they_start_and_their_input_as_streamed() -> None:
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}
    citation = {"type": "web_search_result_location", "url": "https://e.x", "cited_text": "c"}
    chunks = _translate(
        [
            {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
            _block(0, use),
            _delta(0, {"type": "input_json_delta", "partial_json": '{"query": '}),
            _delta(0, {"type": "input_json_delta", "partial_json": '"paris"}'}),
            {"type": "content_block_stop", "index": 0},
            _block(1, result),
            {"type": "content_block_stop", "index": 1},
            _block(2, {"type": "text", "text": ""}),
            _delta(2, {"type": "citations_delta", "citation": citation}),
            _delta(2, {"type": "text_delta", "text": "Sunny."}),
        ]
    )

    blocks = [orjson.loads(c.upstream_block_json) for c in chunks if c.upstream_block_json]
    assert blocks == [use, result]
    # The input's fragments follow the block, as the upstream sent them.
    inputs = [(c.block, c.upstream_input_json) for c in chunks if c.upstream_input_json]
    assert inputs == [(1, '{"query": '), (1, '"paris"}')]
    assert [orjson.loads(t) for c in chunks for t in c.citations_json] == [citation]
    assert chunks[-1].content == "Sunny." and chunks[-1].block == 3


def test_the_merger_keeps_thinking_and_blocks_apart() -> None:
    def chunk(**fields: object) -> pb.StreamChatCompletionResponse:
        return pb.StreamChatCompletionResponse(**fields)  # type: ignore[arg-type]

    merger = ChunkMerger()
    out = [
        merger.add(c)
        for c in (
            chunk(role=pb.ROLE_ASSISTANT),
            chunk(block=1, reasoning=pb.Reasoning(text="a")),
            chunk(block=2, content="x"),
            chunk(block=2, content="y"),
            chunk(block=3, content="z"),
            chunk(finish_reason=pb.FINISH_REASON_STOP),
        )
    ]
    out.append(merger.flush())
    merged = [c for c in out if c is not None]

    assert [(c.block, c.reasoning.text, c.content) for c in merged] == [
        (0, "", ""),
        (1, "a", ""),
        (2, "", "xy"),
        (3, "", "z"),
    ]
    assert merged[-1].finish_reason == pb.FINISH_REASON_STOP


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


def _finish(delta: dict[str, object], usage: dict[str, object]) -> pb.StreamChatCompletionResponse:
    chunks = _translate(
        [
            {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
            {"type": "message_delta", "delta": delta, "usage": usage},
        ]
    )
    return chunks[-1]


def test_anthropic_s_matched_stop_sequence_is_on_the_last_chunk() -> None:
    last = _finish({"stop_reason": "stop_sequence", "stop_sequence": "END"}, {"output_tokens": 2})
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stop_sequence == "END"
    natural = _finish({"stop_reason": "end_turn", "stop_sequence": None}, {"output_tokens": 2})
    assert natural.finish_reason == pb.FINISH_REASON_STOP and natural.stop_sequence == ""


def test_anthropic_s_pause_turn_and_server_tool_counts() -> None:
    last = _finish(
        {"stop_reason": "pause_turn", "stop_sequence": None},
        {"output_tokens": 5, "server_tool_use": {"web_search_requests": 2, "odd": "x"}},
    )
    assert last.finish_reason == pb.FINISH_REASON_PAUSE_TURN
    assert dict(last.usage.server_tool_requests) == {"web_search_requests": 2}
    assert last.usage.completion_tokens == 5 and last.usage.prompt_tokens == 3


def test_the_merger_joins_a_server_tool_s_input_fragments_and_keeps_the_stop() -> None:
    use = orjson.dumps({"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}})
    merger = ChunkMerger()
    out = [
        merger.add(c)
        for c in (
            pb.StreamChatCompletionResponse(role=pb.ROLE_ASSISTANT),
            pb.StreamChatCompletionResponse(block=1, upstream_block_json=use.decode()),
            pb.StreamChatCompletionResponse(block=1, upstream_input_json='{"q": '),
            pb.StreamChatCompletionResponse(block=1, upstream_input_json='"x"}'),
            pb.StreamChatCompletionResponse(block=2, content="Hi"),
            pb.StreamChatCompletionResponse(
                finish_reason=pb.FINISH_REASON_STOP, stop_sequence="END"
            ),
        )
    ]
    out.append(merger.flush())
    merged = [c for c in out if c is not None]
    assert [c.upstream_input_json for c in merged] == ["", "", '{"q": "x"}', ""]
    assert merged[-1].content == "Hi" and merged[-1].stop_sequence == "END"


def test_vllm_and_sglang_name_the_stop_sequence_matched() -> None:
    for key in ("stop_reason", "matched_stop"):
        translator = ChatStreamTranslator(
            completion_id="c", model_id="m/x", provider="m", created=1
        )
        event = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", key: "END"}]}
        chunks = translator.translate(orjson.dumps(event).decode()) + translator.flush()
        assert chunks[-1].stop_sequence == "END" and translator.names_stops
    # A stop token's id is no sequence; llama.cpp's choice has no such field.
    translator = ChatStreamTranslator(completion_id="c", model_id="m/x", provider="m", created=1)
    event = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 2}]}
    chunks = translator.translate(orjson.dumps(event).decode()) + translator.flush()
    assert chunks[-1].stop_sequence == "" and translator.names_stops
    llama = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    translator = ChatStreamTranslator(completion_id="c", model_id="m/x", provider="m", created=1)
    translator.translate(orjson.dumps(llama).decode())
    assert not translator.names_stops


def test_openai_cached_prompt_tokens_are_carried_in_the_usage() -> None:
    translator = ChatStreamTranslator(completion_id="c", model_id="o/m", provider="o", created=1)
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920},
    }
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": usage},
    ]
    chunks = [c for e in events for c in translator.translate(orjson.dumps(e).decode())]
    chunks += translator.translate("[DONE]")

    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.cached_prompt_tokens) == (2006, 1920)


def test_anthropic_prompt_counts_cache_reads_and_writes_and_names_the_reads() -> None:
    # Anthropic counts cache reads and writes apart from input_tokens; the
    # prompt is all three, and the reads are the cached part.
    start_usage = {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188,
        "cache_read_input_tokens": 1000,
    }
    chunks = _translate(
        [
            {"type": "message_start", "message": {"usage": start_usage}},
            _block(0, {"type": "text", "text": ""}),
            _delta(0, {"type": "text_delta", "text": "ok"}),
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 5},
            },
        ]
    )

    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens) == (
        1209,
        1000,
        5,
    )
