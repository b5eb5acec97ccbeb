"""How a reply ends, as Anthropic's Messages API says it, on every kind of
upstream: `stop_reason: "stop_sequence"` with the `stop_sequence` that
matched (whole and streamed), `pause_turn`, and server tools' usage. Where
the upstream names the matched sequence (Anthropic, vLLM) it is passed on;
where it does not (Ollama, llama.cpp) Marie finds it in the text it relays
and ends the reply there. OpenAI's surfaces keep `finish_reason: "stop"`.
SDK → gateway → auth + providers → fake upstreams speaking the real wire
protocols; what each upstream received is checked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes import FakeModel, FakeOllama
from tests.fakes.anthropic_server import FakeAnthropic, FakeClaude
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.stack import Stack, start_stack

KEY = "upstream-test-key"
REPLY = "The answer is 42. END Anything after the end is dropped."
CLAUDE = FakeClaude("claude-stops", reply=REPLY, input_pause=0.3)
PAUSER = FakeClaude("claude-pauser", reply="Still searching.", stop_reason="pause_turn")
OLLAMA_MODEL = FakeModel(name="stops-llama:latest", reply=REPLY)
VLLM_MODEL = FakeChatModel("vllm-model", reply=REPLY)
LLAMA_CPP_MODEL = FakeChatModel("llama-cpp-model", reply=REPLY)
#: Each route, and whether its upstream names the matched stop itself.
ROUTES = {
    "claude/claude-stops": True,
    "vllm/vllm-model": True,
    "ollama/stops-llama:latest": False,
    "llamacpp/llama-cpp-model": False,
}
WEB_SEARCH: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    upstream = FakeAnthropic([CLAUDE, PAUSER], api_key=KEY)
    with upstream:
        yield upstream


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    upstream = FakeOpenAI([VLLM_MODEL], api_key=KEY, vllm=True)
    with upstream:
        yield upstream


@pytest.fixture(scope="module")
def llamacpp() -> Iterator[FakeOpenAI]:
    upstream = FakeOpenAI([LLAMA_CPP_MODEL], api_key=KEY, llama_cpp=True)
    with upstream:
        yield upstream


@pytest.fixture(scope="module")
def stack(
    claude: FakeAnthropic,
    vllm: FakeOpenAI,
    llamacpp: FakeOpenAI,
    ollama: FakeOllama,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    ollama.add_model(OLLAMA_MODEL)
    data_dir = tmp_path_factory.mktemp("stops")
    config = data_dir / "marie.yaml"
    config.write_text(
        f"""\
providers:
  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}
  claude: {{type: anthropic, base_url: "{claude.base_url}", api_key_env: FAKE_KEY}}
  vllm: {{type: openai, base_url: "{vllm.base_url}/v1", api_key_env: FAKE_KEY}}
  llamacpp: {{type: openai, base_url: "{llamacpp.base_url}/v1", api_key_env: FAKE_KEY}}
routing:
  retries: 0
"""
    )
    running = start_stack(data_dir, ollama.base_url, MARIE_CONFIG=str(config), FAKE_KEY=KEY)
    yield running
    running.stop()
    ollama.remove_model(OLLAMA_MODEL.name)


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.create_key("stops")


@pytest.fixture
def client(stack: Stack, key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0) as c:
        yield c


def upstream_stops(
    model: str, claude: FakeAnthropic, vllm: FakeOpenAI, llamacpp: FakeOpenAI, ollama: FakeOllama
) -> Any:
    """The stop sequences the route's upstream was last sent (None: none)."""
    if model.startswith("claude/"):
        body = claude.requests_to("/v1/messages")[-1].body
        return body.get("stop_sequences") if body else None
    if model.startswith("ollama/"):
        body = ollama.chat_requests[-1].body
        return (body or {}).get("options", {}).get("stop")
    fake = vllm if model.startswith("vllm/") else llamacpp
    body = fake.requests_to("/v1/chat/completions")[-1].body
    return (body or {}).get("stop")


@pytest.mark.parametrize("model", list(ROUTES))
def test_a_matched_stop_sequence_is_named_in_the_message(
    model: str,
    client: anthropic.Anthropic,
    claude: FakeAnthropic,
    vllm: FakeOpenAI,
    llamacpp: FakeOpenAI,
    ollama: FakeOllama,
) -> None:
    if model.startswith("vllm/"):
        # Marie learns from a first reply that this upstream names the match.
        client.messages.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    message = client.messages.create(
        model=model,
        max_tokens=256,
        stop_sequences=["NEVER", "END"],
        messages=[{"role": "user", "content": "What is the answer?"}],
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "END"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text.rstrip() == "The answer is 42."  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    sent = upstream_stops(model, claude, vllm, llamacpp, ollama)
    # An upstream that names the match stops there itself; the others are
    # left to run on and Marie closes them at the match.
    assert sent == (["NEVER", "END"] if ROUTES[model] else None)


@pytest.mark.parametrize("model", list(ROUTES))
def test_a_streamed_stop_sequence_is_named_in_message_delta(
    model: str, client: anthropic.Anthropic
) -> None:
    with client.messages.stream(
        model=model,
        max_tokens=256,
        # Spans two of the upstream's pieces (" is" and " 42."): held back
        # while it could still match, never relayed.
        stop_sequences=["is 42"],
        messages=[{"role": "user", "content": "What is the answer?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "The answer "
    deltas = [e for e in events if e.type == "message_delta"]
    assert len(deltas) == 1
    assert deltas[0].delta.stop_reason == "stop_sequence"
    assert deltas[0].delta.stop_sequence == "is 42"
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "is 42"


@pytest.mark.parametrize("model", list(ROUTES))
def test_a_stop_sequence_never_met_ends_the_turn_with_the_whole_text(
    model: str, client: anthropic.Anthropic
) -> None:
    # The reply ends with what begins this sequence: held back, then given
    # whole when the reply ends without it.
    with client.messages.stream(
        model=model,
        max_tokens=256,
        stop_sequences=["dropped. And more"],
        messages=[{"role": "user", "content": "What is the answer?"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.stop_reason == "end_turn" and final.stop_sequence is None


def test_the_raw_stream_carries_the_stop_sequence_as_anthropic_s(stack: Stack, key: str) -> None:
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": "ollama/stops-llama:latest",
            "max_tokens": 64,
            "stream": True,
            "stop_sequences": ["END"],
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    delta = next(line for line in lines if '"message_delta"' in line)
    assert '"delta":{"stop_reason":"stop_sequence","stop_sequence":"END"}' in delta


@pytest.mark.parametrize("model", ["ollama/stops-llama:latest", "vllm/vllm-model"])
def test_openai_chat_still_says_stop_and_leaves_stopping_to_the_upstream(
    model: str,
    stack: Stack,
    key: str,
    claude: FakeAnthropic,
    vllm: FakeOpenAI,
    llamacpp: FakeOpenAI,
    ollama: FakeOllama,
) -> None:
    for stream in (False, True):
        response = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={
                "model": model,
                "stream": stream,
                "stop": ["END"],
                "messages": [{"role": "user", "content": "What is the answer?"}],
            },
            timeout=30,
        )
        assert response.status_code == 200
        assert '"finish_reason":"stop"' in response.text.replace(" ", "")
        assert "stop_sequence" not in response.text
        assert upstream_stops(model, claude, vllm, llamacpp, ollama) == ["END"]


def test_pause_turn_reaches_anthropic_clients_and_is_stop_for_openai_s(
    client: anthropic.Anthropic, stack: Stack, key: str
) -> None:
    message = client.messages.create(
        model="claude/claude-pauser",
        max_tokens=256,
        messages=[{"role": "user", "content": "Search on."}],
    )
    assert message.stop_reason == "pause_turn" and message.stop_sequence is None
    with client.messages.stream(
        model="claude/claude-pauser",
        max_tokens=256,
        messages=[{"role": "user", "content": "Search on."}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "pause_turn"
    chat = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "claude/claude-pauser", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert chat.json()["choices"][0]["finish_reason"] == "stop"


def test_server_tool_use_streams_its_input_as_the_upstream_does_and_counts_requests(
    client: anthropic.Anthropic,
) -> None:
    with client.messages.stream(
        model="claude/claude-stops",
        max_tokens=1024,
        tools=[WEB_SEARCH],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    # The fake Anthropic writes the query in two fragments 0.3 s apart: each
    # relayed as it came, not the whole input once the block ends.
    query = '{"query": "Weather in Paris?"}'
    assert fragments == [query[: len(query) // 2], query[len(query) // 2 :]]
    start = next(e for e in events if e.type == "content_block_start")
    assert start.content_block.type == "server_tool_use"
    assert start.content_block.input == {}
    assert final.content[0].input == {"query": "Weather in Paris?"}  # type: ignore[union-attr]
    assert final.usage.server_tool_use is not None
    assert final.usage.server_tool_use.web_search_requests == 1
    whole = client.messages.create(
        model="claude/claude-stops",
        max_tokens=1024,
        tools=[WEB_SEARCH],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert whole.content[0].input == {"query": "Weather in Paris?"}  # type: ignore[union-attr]
    assert whole.usage.server_tool_use is not None
    assert whole.usage.server_tool_use.web_search_requests == 1


def test_usage_has_no_server_tool_use_when_none_ran(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude/claude-stops",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.usage.server_tool_use is None
