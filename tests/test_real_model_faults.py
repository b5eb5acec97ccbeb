"""Faults of a real model server, through the gateway: llama-server killed in
the middle of an answer, stopped, started again. The server is this
module's own (the shared ones stay up for the other tests); its breaker opens
for 2 s instead of 30 so that recovery is seen quickly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from marie_cli.local_models import LlamaServer
from openai.types.chat import ChatCompletionMessageParam

from tests.stack import Stack, start_stack

MODEL = f"flaky/{LlamaServer.model_id}"
STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a very long story about a dragon and a knight."}
]
RECOVERY_SECONDS = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    llama = LlamaServer(log_path=tmp_path_factory.mktemp("flaky") / "llama.log")
    llama.start()
    yield llama
    llama.stop()


@pytest.fixture(scope="module")
def flaky_stack(server: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir: Path = tmp_path_factory.mktemp("marie-flaky")
    config = data_dir / "marie.yaml"
    config.write_text(
        "providers:\n"
        f'  flaky: {{type: openai, base_url: "{server.base_url}"}}\n'
        "routing: {breaker_open_seconds: 2}\n"
    )
    running = start_stack(data_dir, "http://127.0.0.1:9", MARIE_CONFIG=str(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(flaky_stack: Stack) -> Iterator[openai.OpenAI]:
    key = flaky_stack.create_key("flaky")
    with openai.OpenAI(
        base_url=f"{flaky_stack.base_url}/v1", api_key=key, max_retries=0, timeout=60
    ) as c:
        yield c


def _until_answered(client: openai.OpenAI) -> float:
    """Seconds until a chat succeeds again (fails the test past RECOVERY_SECONDS)."""
    began = time.monotonic()
    while True:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
            return time.monotonic() - began
        except openai.APIError as exc:
            assert time.monotonic() - began < RECOVERY_SECONDS, f"no recovery: {exc}"
            time.sleep(0.5)


def test_a_server_killed_mid_answer_ends_the_stream_with_an_error_after_the_text(
    client: openai.OpenAI, server: LlamaServer
) -> None:
    received: list[str] = []
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=400, stream=True
    )
    began = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 3:
                    server.kill()

    # The text that arrived before the crash was delivered, then an error
    # event (not a hang, not a silent end).
    assert len(received) >= 3
    assert time.monotonic() - began < 30
    assert caught.value.message
    server.start()
    _until_answered(client)


def test_a_stopped_server_is_a_prompt_error_and_a_restarted_one_serves_again(
    client: openai.OpenAI, server: LlamaServer
) -> None:
    server.stop()
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=4)

    assert caught.value.status_code in (502, 503)
    assert "flaky" in caught.value.message
    assert time.monotonic() - began < 15  # retries, then an answer: never a hang

    server.start()
    assert _until_answered(client) < RECOVERY_SECONDS
