"""The Messages API's content blocks from the providers' chunks, without I/O:
thinking, redacted thinking, Anthropic's own blocks and citations become the
blocks and stream events Anthropic sends, each upstream block its own."""

from __future__ import annotations

from typing import Any

import orjson
from marie.providers.v1 import provider_service_pb2 as pb
from marie_gateway.anthropic.translate import MessageBuilder


def _run(*chunks: pb.StreamChatCompletionResponse) -> tuple[MessageBuilder, list[dict[str, Any]]]:
    builder = MessageBuilder("msg_1", "claude/m", single_tool=False)
    events = builder.start()
    for chunk in chunks:
        events += builder.add(chunk)
    events += builder.finish_events()
    return builder, events


def test_thinking_then_text_as_anthropic_streams_them() -> None:
    builder, events = _run(
        pb.StreamChatCompletionResponse(block=1, reasoning=pb.Reasoning(text="Hm")),
        pb.StreamChatCompletionResponse(block=1, reasoning=pb.Reasoning(text="m.")),
        pb.StreamChatCompletionResponse(block=1, reasoning=pb.Reasoning(signature="c2ln")),
        pb.StreamChatCompletionResponse(block=2, reasoning=pb.Reasoning(redacted="ZW5j")),
        pb.StreamChatCompletionResponse(block=3, content="42"),
    )

    assert builder.message()["content"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "ZW5j"},
        {"type": "text", "text": "42"},
    ]
    shown = [(e["type"], e.get("index"), e.get("delta") or e.get("content_block")) for e in events]
    assert shown[1:-2] == [
        ("content_block_start", 0, {"type": "thinking", "thinking": "", "signature": ""}),
        ("ping", None, None),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "Hm"}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "m."}),
        ("content_block_delta", 0, {"type": "signature_delta", "signature": "c2ln"}),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, {"type": "redacted_thinking", "data": "ZW5j"}),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, {"type": "text", "text": ""}),
        ("content_block_delta", 2, {"type": "text_delta", "text": "42"}),
        ("content_block_stop", 2, None),
    ]


def test_thinking_after_a_signature_is_a_new_block() -> None:
    builder, _ = _run(
        pb.StreamChatCompletionResponse(reasoning=pb.Reasoning(text="a", signature="s1")),
        pb.StreamChatCompletionResponse(reasoning=pb.Reasoning(text="b")),
        pb.StreamChatCompletionResponse(reasoning=pb.Reasoning(signature="s2")),
    )

    assert builder.message()["content"] == [
        {"type": "thinking", "thinking": "a", "signature": "s1"},
        {"type": "thinking", "thinking": "b", "signature": "s2"},
    ]


def test_server_blocks_and_citations_keep_anthropic_s_shape() -> None:
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search"}
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}
    citation = {"type": "web_search_result_location", "url": "https://e.x", "cited_text": "c"}
    builder, events = _run(
        pb.StreamChatCompletionResponse(
            block=1, upstream_block_json=orjson.dumps({**use, "input": {"query": "q"}}).decode()
        ),
        pb.StreamChatCompletionResponse(block=2, upstream_block_json=orjson.dumps(result).decode()),
        pb.StreamChatCompletionResponse(block=3, content="It is "),
        pb.StreamChatCompletionResponse(block=4, citations_json=[orjson.dumps(citation).decode()]),
        pb.StreamChatCompletionResponse(block=4, content="sunny"),
        pb.StreamChatCompletionResponse(block=5, content="."),
    )

    assert builder.message()["content"] == [
        {**use, "input": {"query": "q"}},
        result,
        {"type": "text", "text": "It is "},
        {"type": "text", "text": "sunny", "citations": [citation]},
        {"type": "text", "text": "."},
    ]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    # A server tool's use starts empty and gets its input as one delta, as Anthropic sends it.
    assert starts[0] == {**use, "input": {}}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas[0] == {"type": "input_json_delta", "partial_json": '{"query":"q"}'}
    assert {"type": "citations_delta", "citation": citation} in deltas
    assert builder.stop_reason() == "end_turn"
