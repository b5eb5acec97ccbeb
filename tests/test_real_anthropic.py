"""Anthropic's Messages API against a real model server (llama-server with
SmolLM2-135M-Instruct, tests/real_models.py), with the official `anthropic`
SDK and with Claude Code. What the model writes is not asserted, only what
Marie must do with it: shapes, usage, the token count, and the upstream's
refusal of a prompt longer than its context reaching Claude Code as
Anthropic's 400, which it understands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.node_tools import node_or_skip, npm_ci
from tests.real_models import CHAT
from tests.stack import Stack
from tests.test_e2e_anthropic import NODE_PACKAGE, NODE_TIMEOUT_SECONDS, _claude_code

#: Greedy sampling, so the same prompt gets the same reply (no longer in the
#: SDK's signature; the Messages API still takes it).
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(real_stack: Stack, real_key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=real_stack.base_url, api_key=real_key, max_retries=0, timeout=120
    ) as c:
        yield c


def test_a_real_model_answers_a_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=CHAT, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}]
    )
    assert message.model == CHAT
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    assert 1 <= message.usage.output_tokens <= 8


def test_a_real_model_streams_a_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=CHAT, max_tokens=8, messages=[{"role": "user", "content": "Count to three."}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.input_tokens > 0 and 1 <= final.usage.output_tokens <= 8


def test_count_tokens_is_the_real_server_s_count(
    client: anthropic.Anthropic, real_stack: Stack, real_key: str
) -> None:
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "How many tokens is this sentence?"}
    ]
    counted = client.messages.count_tokens(model=CHAT, system="Be brief.", messages=messages)
    answered = client.messages.create(
        model=CHAT, max_tokens=1, system="Be brief.", messages=messages
    )
    # The chat template and tokenizer of the model itself: the same count.
    assert counted.input_tokens == answered.usage.input_tokens > 0
    raw = httpx.post(
        f"{real_stack.base_url}/v1/messages/count_tokens",
        headers={"x-api-key": real_key},
        json={"model": CHAT, "messages": messages},
        timeout=120,
    )
    assert raw.headers["x-marie-token-count"] == "upstream"


def test_claude_code_hears_that_its_prompt_is_too_long_for_the_model(
    real_stack: Stack, real_key: str, tmp_path: Path
) -> None:
    """Claude Code's first request (its system prompt and a dozen tools, about
    9,000 of SmolLM2's tokens) does not fit the test server's 2,048-token
    slots: llama-server refuses it, and Claude Code reports it as the prompt
    being too long instead of retrying or crashing."""
    node_or_skip("Claude Code")
    npm_ci(NODE_PACKAGE, NODE_TIMEOUT_SECONDS)
    workdir = tmp_path / "project"
    workdir.mkdir()
    answer = _claude_code(real_stack, real_key, workdir, "write hello.txt", model=CHAT)
    assert answer["is_error"] is True
    assert answer["api_error_status"] == 400
    assert answer["terminal_reason"] == "prompt_too_long"
    assert "exceeds the available context size" in answer["result"]
    assert not (workdir / "hello.txt").exists()


def test_a_real_model_s_reply_ends_at_a_stop_sequence_named_in_the_answer(
    client: anthropic.Anthropic,
) -> None:
    """llama-server stops at a stop sequence without saying which: Marie
    finds it in the text and names it, whole and streamed. The sequence is
    taken from the model's own greedy reply, so it is met."""
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "Count from 1 to 10, separated by commas."}
    ]
    free = client.messages.create(model=CHAT, max_tokens=24, extra_body=GREEDY, messages=messages)
    text = free.content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    before = text[: text.index(stop)]
    whole = client.messages.create(
        model=CHAT, max_tokens=24, extra_body=GREEDY, stop_sequences=[stop], messages=messages
    )
    assert whole.stop_reason == "stop_sequence" and whole.stop_sequence == stop
    assert whole.content[0].text == before  # type: ignore[union-attr]
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0
    with client.messages.stream(
        model=CHAT, max_tokens=24, extra_body=GREEDY, stop_sequences=[stop], messages=messages
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == before
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    never = client.messages.create(
        model=CHAT,
        max_tokens=24,
        extra_body=GREEDY,
        stop_sequences=["never written by anyone"],
        messages=messages,
    )
    assert never.content[0].text == text  # type: ignore[union-attr]
    assert never.stop_reason == free.stop_reason and never.stop_sequence is None
