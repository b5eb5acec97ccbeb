"""What only Anthropic's own models do (`thinking`, server tools, citations),
passed through `/v1/messages` when the model routes to an Anthropic upstream,
with the official `anthropic` Python SDK: SDK → gateway → auth + providers →
the fake Anthropic API (which streams thinking and server tools as the real
one does, and checks thinking signatures sent back). Routed anywhere else,
the same request is the 400 naming the field it always was, through aliases
and fallbacks too, and no other upstream is asked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes import FakeOllama
from tests.fakes.anthropic_server import (
    CITATION,
    SEARCH_RESULT,
    THINKING_TOKENS,
    FakeAnthropic,
    FakeClaude,
    count_tokens,
    signature,
)
from tests.fakes.upstream import Cue
from tests.stack import Stack, start_stack

KEY = "upstream-test-key"
THINKER = FakeClaude("claude-think", reply="The answer is 42.")
SECRETIVE = FakeClaude(
    "claude-secretive", reply="Done.", redacted_thinking="EmwKAhgBEgy3va3pzix/LafPsn4a"
)
#: A Claude model served by the Anthropic upstream.
CLAUDE = "claude/claude-think"
LLAMA = "ollama/llama3.2:latest"
#: Anthropic first, a local model as its fallback.
CLAUDE_FIRST = "claude-then-local"
#: A local model first, Anthropic as its fallback.
LOCAL_FIRST = "local-then-claude"
THINKING: Any = {"type": "enabled", "budget_tokens": 1024}
WEB_SEARCH: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    upstream = FakeAnthropic([THINKER, SECRETIVE], api_key=KEY)
    with upstream:
        yield upstream


@pytest.fixture(scope="module")
def stack(
    claude: FakeAnthropic, ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("passthrough")
    config = data_dir / "marie.yaml"
    config.write_text(
        f"""\
providers:
  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}
  claude: {{type: anthropic, base_url: "{claude.base_url}", api_key_env: FAKE_CLAUDE_KEY}}
aliases:
  {CLAUDE_FIRST}: [{CLAUDE}, {LLAMA}]
  {LOCAL_FIRST}: [{LLAMA}, {CLAUDE}]
routing:
  retries: 0
"""
    )
    running = start_stack(data_dir, ollama.base_url, MARIE_CONFIG=str(config), FAKE_CLAUDE_KEY=KEY)
    yield running
    running.stop()


@pytest.fixture
def client(
    stack: Stack, claude: FakeAnthropic, ollama: FakeOllama
) -> Iterator[anthropic.Anthropic]:
    claude.reset()
    ollama.reset()
    key = stack.create_key("passthrough")
    with anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0) as c:
        yield c


def received(claude: FakeAnthropic) -> dict[str, Any]:
    """The body of the last Messages request the Anthropic upstream received."""
    body: dict[str, Any] | None = claude.requests_to("/v1/messages")[-1].body
    assert body is not None
    return body


def test_thinking_round_trips_with_its_signature(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    question: Any = {"role": "user", "content": "What is six times seven?"}
    message = client.messages.create(
        model=CLAUDE, max_tokens=2048, thinking=THINKING, messages=[question]
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    thought = message.content[0]
    assert thought.type == "thinking"
    assert thought.thinking == THINKER.thinking
    assert thought.signature == signature(THINKER.thinking)
    assert message.content[1].type == "text" and message.content[1].text == THINKER.reply
    assert message.stop_reason == "end_turn"
    first = received(claude)
    assert first["thinking"] == THINKING
    assert first["max_tokens"] == 2048
    # The next turn sends the thinking back as it came (the upstream checks the
    # signature, as Anthropic does), and the history reaches it whole.
    history: Any = [
        question,
        {
            "role": "assistant",
            "content": [b.model_dump(exclude_none=True) for b in message.content],
        },
        {"role": "user", "content": "And six times eight?"},
    ]
    again = client.messages.create(
        model=CLAUDE, max_tokens=2048, thinking=THINKING, messages=history
    )
    assert [b.type for b in again.content] == ["thinking", "text"]
    sent_back = received(claude)["messages"][1]["content"][0]
    assert sent_back == {
        "type": "thinking",
        "thinking": THINKER.thinking,
        "signature": signature(THINKER.thinking),
    }
    # A tampered block reaches Anthropic as sent, and Anthropic's 400 comes back.
    history[1]["content"][0]["signature"] = "forged"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=CLAUDE, max_tokens=2048, thinking=THINKING, messages=history)
    assert "Invalid `signature`" in caught.value.message


def test_redacted_thinking_comes_back_as_sent(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    message = client.messages.create(
        model="claude/claude-secretive",
        max_tokens=2048,
        thinking=THINKING,
        messages=[{"role": "user", "content": "Plan it."}],
    )
    assert [b.type for b in message.content] == ["thinking", "redacted_thinking", "text"]
    redacted = message.content[1]
    assert redacted.type == "redacted_thinking" and redacted.data == SECRETIVE.redacted_thinking


def test_streamed_thinking_arrives_as_thinking_and_signature_deltas(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    with client.messages.stream(
        model=CLAUDE,
        max_tokens=2048,
        thinking=THINKING,
        messages=[{"role": "user", "content": "What is six times seven?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    kinds = [d.type for d in deltas]
    # Thinking first, its signature closing it, then the answer.
    assert kinds.index("signature_delta") == kinds.count("thinking_delta")
    assert set(kinds[: kinds.index("signature_delta")]) == {"thinking_delta"}
    assert set(kinds[kinds.index("signature_delta") + 1 :]) == {"text_delta"}
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == THINKER.thinking
    assert final.content[0].type == "thinking"
    assert final.content[0].signature == signature(THINKER.thinking)
    assert final.content[1].type == "text" and final.content[1].text == THINKER.reply
    assert received(claude)["thinking"] == THINKING


def test_a_server_tool_is_passed_through_with_its_results_and_citations(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    message = client.messages.create(
        model=CLAUDE,
        max_tokens=1024,
        tools=[WEATHER_TOOL, WEB_SEARCH],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_headers={"anthropic-beta": "web-search-2025-03-05"},
    )
    assert [b.type for b in message.content] == [
        "server_tool_use",
        "web_search_tool_result",
        "text",
        "text",
        "text",
    ]
    use = message.content[0]
    assert use.type == "server_tool_use"
    assert use.id == "srvtoolu_fake1" and use.name == "web_search"
    assert use.input == {"query": "Weather in Paris?"}
    result = message.content[1].model_dump(exclude_none=True)
    assert result["tool_use_id"] == "srvtoolu_fake1"
    assert result["content"] == [SEARCH_RESULT]
    texts = [b for b in message.content[2:] if b.type == "text"]
    assert "".join(t.text for t in texts) == "It is sunny in Paris today."
    assert texts[0].citations is None and texts[2].citations is None
    cited = texts[1].citations
    assert cited is not None and [c.model_dump() for c in cited] == [CITATION]
    # What the upstream received: both tools as sent, and the beta header.
    assert received(claude)["tools"] == [WEATHER_TOOL, WEB_SEARCH]
    request = claude.requests_to("/v1/messages")[-1]
    assert request.headers["anthropic-beta"] == "web-search-2025-03-05"


def test_a_streamed_server_tool_and_its_citations(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    with client.messages.stream(
        model=CLAUDE,
        max_tokens=1024,
        tools=[WEB_SEARCH],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    # The server tool's input in as many fragments as reached Marie together
    # (tests/test_e2e_anthropic_stops.py has them apart).
    deltas = [d for i, d in enumerate(deltas) if d != "input_json_delta" or i == 0]
    assert deltas == [
        "input_json_delta",
        "text_delta",
        "citations_delta",
        "text_delta",
        "text_delta",
    ]
    assert [b.type for b in final.content][:2] == ["server_tool_use", "web_search_tool_result"]
    assert final.content[0].input == {"query": "Weather in Paris?"}  # type: ignore[union-attr]
    cited = final.content[3]
    assert cited.type == "text" and cited.text == "sunny in Paris"
    assert cited.citations is not None and cited.citations[0].model_dump() == CITATION


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        (LLAMA, {"thinking": THINKING}, "thinking: extended thinking is not supported"),
        # An alias whose first choice is local: the route is not Anthropic's.
        (LOCAL_FIRST, {"thinking": THINKING}, "thinking: extended thinking is not supported"),
        (
            LLAMA,
            {"tools": [WEATHER_TOOL, WEB_SEARCH]},
            "tools.1.type: 'web_search_20250305' is one of Anthropic's server tools",
        ),
        (
            LOCAL_FIRST,
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "t", "signature": "s"},
                            {"type": "text", "text": "y"},
                        ],
                    },
                    {"role": "user", "content": "z"},
                ]
            },
            "messages.1.content.0.type: thinking blocks are not supported",
        ),
    ],
)
def test_routed_elsewhere_it_is_the_400_naming_the_field(
    client: anthropic.Anthropic,
    claude: FakeAnthropic,
    ollama: FakeOllama,
    model: str,
    extra: dict[str, Any],
    message: str,
) -> None:
    body = {
        "model": model,
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": "x"}],
        **extra,
    }
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.post("/v1/messages", body={**body, "stream": stream}, cast_to=httpx.Response)
        error = caught.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(message), error["message"]
    assert ollama.chat_requests == []
    assert claude.requests_to("/v1/messages") == []


def test_a_fallback_of_another_kind_never_drops_thinking(
    client: anthropic.Anthropic, claude: FakeAnthropic, ollama: FakeOllama
) -> None:
    # Without thinking, the alias falls back to the local model when Anthropic fails.
    claude.fail_next(Cue.status_error(500))
    plain = client.messages.create(
        model=CLAUDE_FIRST, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert plain.model == LLAMA
    assert len(ollama.chat_requests) == 1
    # With thinking, the local fallback is not tried: Anthropic's failure is the answer.
    claude.fail_next(Cue.status_error(500))
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(
            model=CLAUDE_FIRST,
            max_tokens=2048,
            thinking=THINKING,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert len(ollama.chat_requests) == 1
    # And when Anthropic answers, the alias's thinking comes back.
    thought = client.messages.create(
        model=CLAUDE_FIRST,
        max_tokens=2048,
        thinking=THINKING,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert thought.model == CLAUDE
    assert [b.type for b in thought.content] == ["thinking", "text"]


def test_count_tokens_with_thinking_is_anthropic_s_own_count(
    client: anthropic.Anthropic, claude: FakeAnthropic
) -> None:
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    raw = client.messages.with_raw_response.count_tokens(
        model=CLAUDE, system="Be brief.", thinking=THINKING, tools=[WEB_SEARCH], messages=messages
    )
    assert raw.headers["x-marie-token-count"] == "upstream"
    # Anthropic's count_tokens was asked, with the thinking and the server
    # tool as sent, and nothing was generated for it.
    body = claude.requests_to("/v1/messages/count_tokens")[-1].body
    assert body == {
        "model": "claude-think",
        "system": "Be brief.",
        # As the gateway translated them (a text block), as every route gets them.
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        "tools": [WEB_SEARCH],
        "thinking": THINKING,
    }
    assert raw.parse().input_tokens == count_tokens(body)
    assert claude.requests_to("/v1/messages") == []
    # Thinking counts: the same prompt without it is counted smaller.
    plain = client.messages.count_tokens(
        model=CLAUDE, system="Be brief.", tools=[WEB_SEARCH], messages=messages
    )
    assert plain.input_tokens == raw.parse().input_tokens - THINKING_TOKENS


def test_a_count_anthropic_makes_without_generating_is_not_charged(
    stack: Stack, claude: FakeAnthropic, ollama: FakeOllama
) -> None:
    """Anthropic counts for free: the key's ledger records the request with no
    tokens. A local model counts by generating one token, which it spends."""
    claude.reset()
    ollama.reset()
    key = stack.create_key("counting")
    hello: Any = [{"role": "user", "content": "Weather in Paris?"}]
    with anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0) as client:
        assert client.messages.count_tokens(model=CLAUDE, messages=hello).input_tokens > 0
        assert client.messages.count_tokens(model=LLAMA, messages=hello).input_tokens > 0
    groups = _usage_by_model(stack, key, requests=2)
    assert groups[CLAUDE]["requests"] == 1
    assert groups[CLAUDE]["prompt_tokens"] == 0
    assert groups[CLAUDE]["completion_tokens"] == 0
    assert groups[LLAMA]["prompt_tokens"] > 0


def _usage_by_model(stack: Stack, key: str, *, requests: int) -> dict[str, dict[str, Any]]:
    """The key's usage by model once the ledger holds `requests` rows
    (rows are written within about a second)."""
    deadline = time.monotonic() + 10
    while True:
        reply = httpx.get(
            f"{stack.base_url}/api/usage",
            headers={"Authorization": f"Bearer {key}"},
            params={"group_by": "model"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        report: dict[str, Any] = reply.json()
        if report["total"]["requests"] >= requests or time.monotonic() > deadline:
            return {group["group"]: group for group in report["groups"]}
        time.sleep(0.1)


def test_count_tokens_with_thinking_on_a_local_model_counts_the_prompt(
    client: anthropic.Anthropic, ollama: FakeOllama
) -> None:
    raw = client.messages.with_raw_response.count_tokens(
        model=LLAMA, thinking=THINKING, messages=[{"role": "user", "content": "hi"}]
    )
    # The model's own count of the prompt: a model that cannot think counts
    # no thinking, and the request is not refused for it (create would be).
    assert raw.headers["x-marie-token-count"] == "upstream"
    assert raw.parse().input_tokens > 0
    assert "thinking" not in ollama.chat_requests[-1].body


def test_adaptive_thinking_reaches_anthropic_and_is_a_hint_elsewhere(
    client: anthropic.Anthropic, claude: FakeAnthropic, ollama: FakeOllama
) -> None:
    # What Claude Code sends by default: Anthropic decides to think.
    adaptive: Any = {"type": "adaptive"}
    hello: Any = [{"role": "user", "content": "hi"}]
    message = client.messages.create(
        model=CLAUDE, max_tokens=256, thinking=adaptive, messages=hello
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert received(claude)["thinking"] == adaptive
    # A local model first: served without it, and no fallback is skipped for it.
    local = client.messages.create(
        model=LOCAL_FIRST, max_tokens=256, thinking=adaptive, messages=hello
    )
    assert local.model == LLAMA
    assert [b.type for b in local.content] == ["text"]
    assert "thinking" not in ollama.chat_requests[-1].body
