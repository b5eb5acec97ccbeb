"""Anthropic's Messages API end to end with the official `anthropic` Python
SDK: SDK → gateway (`/v1/messages`) → auth + providers → fake Ollama, every
service a real process. What the fake upstream received is checked, so the
translation is seen on both sides; every error class the SDK has for a status
is provoked for real (bad key, missing scope, unknown model, bad body, key
limits, a failing upstream, a busy deployment)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.node_tools import node_or_skip, npm_ci
from tests.stack import ROOT, Stack, start_stack

#: The Claude names clients insist on, mapped to local models by aliases.
SONNET = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5"
LLAMA = "ollama/llama3.2:latest"
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TOOLY = FakeModel(
    name="anthropic-tooly:latest",
    capabilities=["completion", "tools"],
    tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
)
TWO_CALLS = FakeModel(
    name="anthropic-twocalls:latest",
    capabilities=["completion", "tools"],
    tool_calls=[
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ],
)
FAILING = FakeModel(name="anthropic-failing:latest", status_error=(500, "model runner crashed"))
BROKEN = FakeModel(
    name="anthropic-broken:latest", reply="one two three four five six", error_after=2
)
SLOW = FakeModel(name="anthropic-slow:latest", endless=True, chunk_delay=0.05)
#: Reports no prompt size (Ollama leaves prompt_eval_count out when it is 0).
UNCOUNTED = FakeModel(name="anthropic-uncounted:latest", prompt_eval_count=0)
#: Claude Code's main model: scripted per test (tool_call_turns).
AGENT = FakeModel(name="anthropic-agent:latest", capabilities=["completion", "tools"])
#: The Claude name Claude Code is pointed at, an alias of AGENT.
OPUS = "claude-opus-4-7"
MODELS = (TOOLY, TWO_CALLS, FAILING, BROKEN, SLOW, AGENT, UNCOUNTED)
#: The Node programs (Anthropic's TypeScript SDK, Claude Code), pinned with their lock file.
NODE_PACKAGE = ROOT / "tests" / "node_anthropic"
NODE_TIMEOUT_SECONDS = 600


@pytest.fixture(scope="module")
def claude_stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for model in MODELS:
        ollama.add_model(model)
    data_dir = tmp_path_factory.mktemp("anthropic")
    config = data_dir / "marie.yaml"
    config.write_text(
        f"""\
providers:
  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}
  busy:   {{type: ollama, base_url: "{ollama.base_url}", max_concurrency: 1}}
aliases:
  {SONNET}: [ollama/llama3.2:latest]
  {HAIKU}: [ollama/qwen2.5:0.5b]
  {OPUS}: [ollama/{AGENT.name}]
routing:
  retries: 0
"""
    )
    running = start_stack(data_dir, ollama.base_url, MARIE_CONFIG=str(config))
    yield running
    running.stop()
    for model in MODELS:
        ollama.remove_model(model.name)


@pytest.fixture(scope="module")
def key(claude_stack: Stack) -> str:
    return claude_stack.create_key("anthropic")


@pytest.fixture
def client(claude_stack: Stack, key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=claude_stack.base_url, api_key=key, max_retries=0) as c:
        yield c


def sent(ollama: FakeOllama) -> dict[str, Any]:
    body: dict[str, Any] | None = ollama.chat_requests[-1].body
    assert body is not None
    return body


def test_create_answers_a_message_from_the_aliased_model(
    client: anthropic.Anthropic, ollama: FakeOllama
) -> None:
    ollama.reset()
    message = client.messages.create(
        model=SONNET,
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi there"}],
        stop_sequences=["END"],
        # No longer in the SDK's signature, still sent by older clients.
        extra_body={"temperature": 0.5, "top_k": 20},
    )
    assert message.id.startswith("msg_01")
    assert message.type == "message"
    assert message.role == "assistant"
    # The reply names what served it, as for every alias.
    assert message.model == LLAMA
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello from llama3.2:latest! You said: hi there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    body = sent(ollama)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
    ]
    assert body["options"]["num_predict"] == 64
    assert body["options"]["top_k"] == 20
    # Ollama never says which stop sequence it met: Marie looks for them in
    # the reply itself (tests/test_e2e_anthropic_stops.py) and sends none.
    assert "stop" not in body["options"]
    assert body["options"]["temperature"] == pytest.approx(0.5)


def test_the_raw_answer_has_anthropic_fields_in_order(claude_stack: Stack, key: str) -> None:
    r = httpx.post(
        f"{claude_stack.base_url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": SONNET, "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == [
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
    ]
    assert list(body["usage"]) == [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    ]
    assert r.headers["request-id"] == r.headers["x-request-id"]


def test_system_blocks_images_and_history_reach_the_upstream(
    client: anthropic.Anthropic, ollama: FakeOllama
) -> None:
    ollama.reset()
    client.messages.create(
        model=LLAMA,
        max_tokens=32,
        system=[
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Answer in French."},
        ],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "premier"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                ],
            },
        ],
    )
    body = sent(ollama)
    assert body["messages"][0] == {
        "role": "system",
        "content": "You are terse.\nAnswer in French.",
    }
    assert body["messages"][1:3] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "premier"},
    ]
    assert body["messages"][3]["content"] == "what is this?"
    assert body["messages"][3]["images"] == ["iVBORw0K"]


def test_the_stream_helpers_assemble_the_text(
    client: anthropic.Anthropic, paced_llama: None
) -> None:
    with client.messages.stream(
        model=SONNET, max_tokens=64, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    text = "Hello from llama3.2:latest! You said: stream please"
    assert "".join(pieces) == text
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_the_stream_sends_anthropic_events_in_order(claude_stack: Stack, key: str) -> None:
    with httpx.stream(
        "POST",
        f"{claude_stack.base_url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": SONNET,
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "events"}],
        },
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    frames = [f for f in text.split("\n\n") if f.strip() and not f.startswith(":")]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert names[:4] == ["message_start", "content_block_start", "ping", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert "[DONE]" not in text
    # Each data line names its own event type.
    for frame, name in zip(frames, names, strict=True):
        assert f'"type":"{name}"' in frame.split("\n")[1]


def test_a_tool_round_trip(client: anthropic.Anthropic, ollama: FakeOllama) -> None:
    ollama.reset()
    asked = client.messages.create(
        model=TOOLY.name.join(["ollama/", ""]),
        max_tokens=64,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )
    assert asked.stop_reason == "tool_use"
    call = asked.content[-1]
    assert call.type == "tool_use"
    assert call.id.startswith("toolu_01")
    assert call.name == "get_weather"
    assert call.input == {"city": "Paris"}
    tools = sent(ollama)["tools"]
    assert tools[0]["function"]["name"] == "get_weather"
    assert tools[0]["function"]["parameters"]["required"] == ["city"]

    answered = client.messages.create(
        model=TOOLY.name.join(["ollama/", ""]),
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": asked.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "19C"}],
            },
        ],
    )
    assert answered.stop_reason == "end_turn"
    assert answered.content[0].text.startswith("Hello from")  # type: ignore[union-attr]
    history = sent(ollama)["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert history[2]["content"] == "19C"


def test_a_failed_tool_result_tells_the_model(
    client: anthropic.Anthropic, ollama: FakeOllama
) -> None:
    ollama.reset()
    client.messages.create(
        model=LLAMA,
        max_tokens=16,
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "city not found"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "try another city"},
                ],
            },
        ],
    )
    history = sent(ollama)["messages"]
    # The results first (each a tool message), then the turn's own text.
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "user"]
    assert history[2]["content"] == "Error: city not found"
    assert history[3]["content"] == "try another city"


def test_a_streamed_tool_call_arrives_as_input_json_deltas(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=TOOLY.name.join(["ollama/", ""]),
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert "input_json" in kinds
    starts = [e for e in events if e.type == "content_block_start"]
    assert starts[-1].content_block.type == "tool_use"
    assert final.stop_reason == "tool_use"
    assert final.content[-1].input == {"city": "Paris"}  # type: ignore[union-attr]


def test_disable_parallel_tool_use_keeps_the_first_call(client: anthropic.Anthropic) -> None:
    model = TWO_CALLS.name.join(["ollama/", ""])
    both = client.messages.create(
        model=model,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "two cities"}],
    )
    assert [b.input for b in both.content if b.type == "tool_use"] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    one = client.messages.create(
        model=model,
        max_tokens=64,
        tools=[WEATHER_TOOL],
        # auto: Ollama's /api/chat cannot force a call, so Marie refuses `any` there.
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "two cities"}],
    )
    assert [b.input for b in one.content if b.type == "tool_use"] == [{"city": "Paris"}]


def test_tool_choice_becomes_the_chat_contract_s(
    client: anthropic.Anthropic, claude_stack: Stack, key: str, ollama: FakeOllama
) -> None:
    ollama.reset()
    client.messages.create(
        model=LLAMA,
        max_tokens=16,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "no tools"}],
    )
    # Ollama has no tool_choice: "none" sends no tools at all.
    assert "tools" not in sent(ollama) or not sent(ollama)["tools"]
    bad = httpx.post(
        f"{claude_stack.base_url}/v1/messages",
        headers={"x-api-key": key},
        json={
            "model": LLAMA,
            "max_tokens": 16,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "tool", "name": "nope"},
            "messages": [{"role": "user", "content": "x"}],
        },
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["message"].startswith("tool_choice.name:")


def test_count_tokens_is_the_upstream_s_count(
    client: anthropic.Anthropic, claude_stack: Stack, key: str
) -> None:
    counted = client.messages.count_tokens(
        model=SONNET,
        system="one two",
        messages=[{"role": "user", "content": "three four five"}],
    )
    # The fake counts words of every message as its prompt_eval_count.
    assert counted.input_tokens == 5
    raw = httpx.post(
        f"{claude_stack.base_url}/v1/messages/count_tokens",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": SONNET, "messages": [{"role": "user", "content": "a b"}]},
        timeout=30,
    )
    assert raw.json() == {"input_tokens": 2}
    assert raw.headers["x-marie-token-count"] == "upstream"


def test_count_tokens_estimates_where_the_upstream_reports_no_count(
    claude_stack: Stack, key: str
) -> None:
    text = "x" * 400
    raw = httpx.post(
        f"{claude_stack.base_url}/v1/messages/count_tokens",
        headers={"x-api-key": key},
        json={"model": "ollama/" + UNCOUNTED.name, "messages": [{"role": "user", "content": text}]},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-marie-token-count"] == "estimate"
    # 400 characters at four a token, and the template's four for the message.
    assert raw.json() == {"input_tokens": 104}


def test_models_list_in_anthropic_shape_with_anthropic_version(
    client: anthropic.Anthropic, claude_stack: Stack, key: str
) -> None:
    page = client.models.list(limit=2)
    assert len(page.data) == 2
    assert all(m.type == "model" for m in page.data)
    ids = [m.id for m in client.models.list(limit=1000).data]
    assert SONNET in ids and LLAMA in ids
    one = client.models.retrieve(SONNET)
    assert one.id == SONNET and one.type == "model"
    raw = httpx.get(
        f"{claude_stack.base_url}/v1/models",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        params={"limit": 1},
    ).json()
    assert set(raw) == {"data", "has_more", "first_id", "last_id"}
    assert raw["has_more"] is True and raw["first_id"] == raw["last_id"] == raw["data"][0]["id"]
    after = httpx.get(
        f"{claude_stack.base_url}/v1/models",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        params={"after_id": raw["last_id"], "limit": 1},
    ).json()
    assert after["data"][0]["id"] == ids[1]
    # Without the header, the OpenAI shape.
    openai_shape = httpx.get(
        f"{claude_stack.base_url}/v1/models", headers={"authorization": f"Bearer {key}"}
    ).json()
    assert openai_shape["object"] == "list"


def test_bearer_tokens_work_as_x_api_key_does(claude_stack: Stack, key: str) -> None:
    with anthropic.Anthropic(
        base_url=claude_stack.base_url, auth_token=key, api_key=None, max_retries=0
    ) as bearer:
        reply = bearer.messages.create(
            model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "bearer"}]
        )
    assert reply.content[0].text.endswith("bearer")  # type: ignore[union-attr]


# -- errors: every class of the SDK, from a real cause ---------------------------


def test_a_bad_key_is_an_authentication_error(claude_stack: Stack) -> None:
    with (
        anthropic.Anthropic(
            base_url=claude_stack.base_url, api_key="sk-marie-not-a-key", max_retries=0
        ) as bad,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        bad.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert caught.value.request_id


def test_a_model_outside_the_key_s_list_is_a_permission_error(claude_stack: Stack) -> None:
    limited = claude_stack.create_key("anthropic-limited", "--model", "ollama/qwen2.5:0.5b")
    with anthropic.Anthropic(base_url=claude_stack.base_url, api_key=limited, max_retries=0) as c:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            c.messages.create(
                model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        # The alias of an allowed model is allowed.
        c.messages.create(model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "permission_error"  # type: ignore[index]


def test_an_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(
            model="claude-nonexistent-9", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model": SONNET, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens: Field required",
        ),
        (
            {"model": SONNET, "max_tokens": "8", "messages": [{"role": "user", "content": "x"}]},
            "max_tokens: Input should be a valid integer",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "frobnicate": True,
            },
            "frobnicate: Extra inputs are not permitted",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x", "name": "bob"}],
            },
            "messages.0.name: Extra inputs are not permitted",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [{"role": "system", "content": "x"}],
            },
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": [{"type": "text"}]}],
            },
            "messages.0.content.0.text: Field required",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [{"role": "user", "content": "x"}],
            },
            "thinking: extended thinking is not supported",
        ),
        (
            # A type that is no string was a 500 (found by schemathesis).
            {
                "model": SONNET,
                "max_tokens": 8,
                "thinking": {"type": {}},
                "messages": [{"role": "user", "content": "x"}],
            },
            "thinking: extended thinking is not supported",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "messages": [{"role": "user", "content": "x"}],
            },
            "tools.0.type: 'web_search_20250305' is one of Anthropic's server tools",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {"type": "text", "media_type": "text/plain", "data": "d"},
                            }
                        ],
                    }
                ],
            },
            "messages.0.content.0.type: document blocks are not supported",
        ),
        (
            {"model": SONNET, "max_tokens": 8, "messages": []},
            "messages: at least one message is required",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": []}, {"role": "user", "content": "x"}],
            },
            "messages.0: all messages must have non-empty content",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "mcp_servers": [{"type": "url", "url": "https://example.com", "name": "m"}],
                "messages": [{"role": "user", "content": "x"}],
            },
            "mcp_servers: MCP servers are not supported",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "x", "citations": [{"a": 1}]}],
                    }
                ],
            },
            "messages.0.content.0.citations: citations are not supported",
        ),
        (
            {"model": SONNET, "max_tokens": 2**40, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens: Input should be less than or equal to 2147483647",
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 8,
                "temperature": 1.5,
                "messages": [{"role": "user", "content": "x"}],
            },
            "temperature: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_requests_are_invalid_request_errors_naming_the_field(
    client: anthropic.Anthropic, ollama: FakeOllama, body: dict[str, Any], message: str
) -> None:
    ollama.reset()
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body=body, cast_to=httpx.Response)
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message), error["message"]
    assert ollama.chat_requests == []


def test_unknown_fields_of_betas_are_ignored_with_anthropic_beta(
    client: anthropic.Anthropic,
) -> None:
    reply = client.messages.create(
        model=SONNET,
        max_tokens=8,
        messages=[{"role": "user", "content": "beta"}],
        extra_body={"context_management": {"edits": []}},
        extra_headers={"anthropic-beta": "context-management-2025-06-27"},
    )
    assert reply.stop_reason == "end_turn"


def test_cache_control_and_disabled_thinking_are_accepted(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model=SONNET,
        max_tokens=8,
        thinking={"type": "disabled"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
    )
    assert reply.usage.cache_creation_input_tokens == 0


def test_key_limits_are_rate_limit_errors_with_retry_after(claude_stack: Stack) -> None:
    limited = claude_stack.create_key("anthropic-rpm", "--rpm", "1")
    with anthropic.Anthropic(base_url=claude_stack.base_url, api_key=limited, max_retries=0) as c:
        c.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "1"}])
        with pytest.raises(anthropic.RateLimitError) as caught:
            c.messages.create(
                model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "2"}]
            )
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    # Anthropic's names for the same figures, the reset as a time.
    assert headers["anthropic-ratelimit-requests-limit"] == "1"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    assert 0 < (reset - datetime.now(UTC)).total_seconds() <= 61


def test_a_body_over_the_size_limit_is_request_too_large(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        client.messages.create(
            model=SONNET,
            max_tokens=8,
            messages=[{"role": "user", "content": "x" * (17 * 1024 * 1024)}],
        )
    assert caught.value.status_code == 413
    assert caught.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


def test_a_failing_upstream_is_an_api_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(
            model=FAILING.name.join(["ollama/", ""]),
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
        )
    assert caught.value.status_code >= 500
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_a_busy_deployment_is_overloaded_529(
    claude_stack: Stack, key: str, client: anthropic.Anthropic, ollama: FakeOllama
) -> None:
    busy_model = "busy/" + SLOW.name
    holder = threading.Event()

    def hold() -> None:
        with httpx.stream(
            "POST",
            f"{claude_stack.base_url}/v1/messages",
            headers={"x-api-key": key},
            json={
                "model": busy_model,
                "max_tokens": 1000,
                "stream": True,
                "messages": [{"role": "user", "content": "go on"}],
            },
            timeout=30,
        ) as r:
            for _ in r.iter_bytes():
                holder.set()
                if stop.is_set():
                    return

    stop = threading.Event()
    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holder.wait(10)
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(
                model=busy_model, max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    finally:
        stop.set()
        thread.join(10)
    assert caught.value.status_code == 529
    assert isinstance(caught.value, anthropic.OverloadedError)
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_an_error_mid_stream_is_an_error_event(client: anthropic.Anthropic) -> None:
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(
            model=BROKEN.name.join(["ollama/", ""]),
            max_tokens=64,
            messages=[{"role": "user", "content": "x"}],
        ) as stream,
    ):
        texts.extend(stream.text_stream)
    assert "".join(texts)  # what came before the error was delivered
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_unknown_paths_and_methods_answer_in_anthropic_shape(claude_stack: Stack, key: str) -> None:
    missing = httpx.post(
        f"{claude_stack.base_url}/v1/messages/batches", headers={"x-api-key": key}, json={}
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{claude_stack.base_url}/v1/messages", headers={"x-api-key": key})
    assert wrong.status_code == 404
    assert wrong.json()["type"] == "error"
    empty = httpx.post(
        f"{claude_stack.base_url}/v1/messages",
        headers={"x-api-key": key, "content-type": "application/json"},
        content=b"[1]",
    )
    assert empty.status_code == 400
    assert empty.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_stops_the_upstream(
    claude_stack: Stack, key: str, ollama: FakeOllama
) -> None:
    ollama.reset()
    with httpx.stream(
        "POST",
        f"{claude_stack.base_url}/v1/messages",
        headers={"x-api-key": key},
        json={
            "model": SLOW.name.join(["ollama/", ""]),
            "max_tokens": 1000,
            "stream": True,
            "messages": [{"role": "user", "content": "forever"}],
        },
        timeout=30,
    ) as r:
        for _ in r.iter_bytes():
            break
    assert ollama.wait_for_disconnect(timeout=10)


def test_messages_are_in_the_usage_ledger(claude_stack: Stack) -> None:
    own = claude_stack.create_key("anthropic-ledger")
    with anthropic.Anthropic(base_url=claude_stack.base_url, api_key=own, max_retries=0) as c:
        c.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "1"}])
    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(
            f"{claude_stack.base_url}/api/usage",
            headers={"authorization": f"Bearer {own}"},
            params={"group_by": "model"},
        ).json()
        if report["total"]["requests"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert report["total"]["requests"] == 1
    assert report["total"]["prompt_tokens"] > 0
    metrics = httpx.get(f"{claude_stack.base_url}/metrics").text
    assert 'route="/v1/messages"' in metrics


# -- real clients in Node: Anthropic's TypeScript SDK and Claude Code -------------


def test_the_typescript_sdk_speaks_the_messages_api(
    claude_stack: Stack, key: str, ollama: FakeOllama
) -> None:
    node = node_or_skip("the TypeScript SDK and Claude Code")
    npm_ci(NODE_PACKAGE, NODE_TIMEOUT_SECONDS)
    ollama.reset()
    env = {
        **os.environ,
        "MARIE_BASE_URL": claude_stack.base_url,
        "MARIE_API_KEY": key,
        "MARIE_LIMITED_KEY": claude_stack.create_key("node-limited", "--model", "ollama/none"),
        "MARIE_RPM_KEY": claude_stack.create_key("node-rpm", "--rpm", "1"),
        "MARIE_MODEL": SONNET,
        "MARIE_TOOL_MODEL": "ollama/" + TOOLY.name,
        "MARIE_FAILING_MODEL": "ollama/" + FAILING.name,
    }
    done = subprocess.run(
        [node, "messages.mjs"],
        cwd=NODE_PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert passed == ["create", "stream", "tools", "count_tokens", "models", "errors"]
    bodies = [r.body for r in ollama.chat_requests if r.body is not None]
    tool_turn = next(
        b for b in bodies if any(m.get("content") == "21C from node" for m in b["messages"])
    )
    assert [m["role"] for m in tool_turn["messages"]] == ["user", "assistant", "tool"]


def _claude_code(
    stack: Stack, key: str, workdir: Path, prompt: str, *, model: str
) -> dict[str, Any]:
    """Claude Code in headless mode against the stack, with nothing to reach
    but Marie: its answer (`--output-format json`)."""
    claude = NODE_PACKAGE / "node_modules" / ".bin" / "claude"
    home = workdir.parent / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": stack.base_url,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": model,
        # Background calls (titles, summaries) go to the small model.
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": HAIKU,
        "ANTHROPIC_SMALL_FAST_MODEL": HAIKU,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    done = subprocess.run(
        [str(claude), "-p", prompt, "--output-format", "json", "--permission-mode", "acceptEdits"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.stdout, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_claude_code_writes_and_reads_a_file_through_marie(
    claude_stack: Stack, key: str, ollama: FakeOllama, tmp_path: Path
) -> None:
    node_or_skip("the TypeScript SDK and Claude Code")
    npm_ci(NODE_PACKAGE, NODE_TIMEOUT_SECONDS)
    workdir = tmp_path / "project"
    workdir.mkdir()
    target = workdir / "hello.txt"
    ollama.set_model(
        AGENT.name,
        reply="The file says: hello from marie",
        tool_call_turns=[
            [
                {
                    "function": {
                        "name": "Write",
                        "arguments": {"file_path": str(target), "content": "hello from marie\n"},
                    }
                }
            ],
            [{"function": {"name": "Read", "arguments": {"file_path": str(target)}}}],
        ],
    )
    ollama.reset()
    answer = _claude_code(
        claude_stack, key, workdir, "write hello.txt, then read it back", model=OPUS
    )
    assert answer["is_error"] is False, answer
    assert answer["result"] == "The file says: hello from marie"
    assert answer["num_turns"] == 3
    # The Write tool really ran, and the Read tool's output went back up.
    assert target.read_text() == "hello from marie\n"
    agent_turns = [r.body for r in ollama.chat_requests if r.body and r.body["model"] == AGENT.name]
    assert len(agent_turns) == 3
    last = agent_turns[-1]["messages"]
    assert [m["role"] for m in last[-4:]] == ["assistant", "tool", "assistant", "tool"]
    assert "hello from marie" in last[-1]["content"]
    # Claude Code's tools reached the model as functions.
    names = {t["function"]["name"] for t in agent_turns[0]["tools"]}
    assert {"Write", "Read", "Bash"} <= names


def test_every_integer_of_every_request_model_is_bounded() -> None:
    """As on the OpenAI surface: a large value is a 400 naming the field, never a 500."""
    from marie_gateway.anthropic import schemas  # noqa: PLC0415

    from tests.test_e2e_hardening import _int_fields  # noqa: PLC0415

    unbounded: list[str] = []
    seen: set[type[Any]] = set()
    for model in (schemas.MessagesRequest, schemas.CountTokensRequest):
        unbounded += _int_fields(model, seen)
    assert unbounded == []
