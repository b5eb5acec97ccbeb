"""The OpenAI-compatible provider against a real OpenAI-compatible server, not a fake:
llama-cpp-python's server (llama.cpp inside) serving a tiny llama model this
test writes itself (`real_llama/write_tiny_gguf.py`, seeded random weights),
driven end to end with the official openai SDK through the gateway.

Opt-in: `make test-real-server` installs llama-cpp-python into `.venv-llama`
(compiling llama.cpp from source the first time; uv caches the built wheel)
and sets MARIE_LLAMA_PYTHON. Without it these tests are skipped, saying why:
the compile takes longer than the whole rest of the suite on CI's two cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes import FakeOllama
from tests.stack import ROOT, Stack, free_ports, start_stack

LLAMA_PYTHON = os.environ.get("MARIE_LLAMA_PYTHON", "")
START_TIMEOUT_SECONDS = 120.0
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world"}]

pytestmark = pytest.mark.skipif(
    not LLAMA_PYTHON,
    reason="opt-in real-server test: run `make test-real-server` (builds llama-cpp-python)",
)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running llama-cpp-python server; yields its /v1 base URL."""
    work = tmp_path_factory.mktemp("llama")
    model = work / "tiny.gguf"
    subprocess.run(
        [LLAMA_PYTHON, str(ROOT / "tests" / "real_llama" / "write_tiny_gguf.py"), str(model)],
        check=True,
        timeout=120,
    )
    (port,) = free_ports(1)
    log_path = work / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                LLAMA_PYTHON,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                "tiny",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "512",
                "--n_threads",
                "1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama server exited:\n{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama server not up:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def real_stack(
    llama_server: str, ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("real")
    config = data_dir / "marie.yaml"
    config.write_text(
        "providers:\n"
        f'  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}\n'
        f'  local: {{type: openai, base_url: "{llama_server}"}}\n'
        "aliases:\n"
        "  tiny: [local/tiny]\n"
    )
    running = start_stack(data_dir, ollama.base_url, MARIE_CONFIG=str(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(real_stack: Stack) -> Iterator[openai.OpenAI]:
    key = real_stack.create_key("real")
    with openai.OpenAI(base_url=f"{real_stack.base_url}/v1", api_key=key, max_retries=0) as c:
        yield c


def test_the_real_servers_model_is_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}

    assert {"local/tiny", "tiny"} <= ids


def test_a_non_streaming_completion_from_the_real_server(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="local/tiny", messages=HELLO, max_tokens=8, temperature=0
    )

    assert reply.model == "local/tiny"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 8


def test_streaming_gives_the_same_greedy_text_as_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="local/tiny", messages=HELLO, max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(c.model == "local/tiny" for c in chunks)


def test_a_stopped_stream_leaves_the_real_server_serving(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="local/tiny", messages=HELLO, max_tokens=200, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()

    again = client.chat.completions.create(
        model="local/tiny", messages=HELLO, max_tokens=4, temperature=0
    )
    assert again.choices[0].message.content


def test_a_legacy_text_completion_from_the_real_server(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="local/tiny", prompt="hello world", max_tokens=8, temperature=0, logprobs=1
    )
    choice = whole.choices[0]
    assert whole.object == "text_completion"
    assert choice.text
    assert choice.finish_reason in ("length", "stop")
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 8
    assert choice.logprobs is not None and choice.logprobs.tokens
    assert all(v <= 0 for v in choice.logprobs.token_logprobs or [])
    streamed = client.completions.create(
        model="local/tiny", prompt="hello world", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_chat_logprobs_from_the_real_server(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="local/tiny",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert 1 <= len(logprobs.content) <= 4
    assert all(e.logprob <= 0 and len(e.top_logprobs) <= 2 for e in logprobs.content)


def test_the_model_file_is_written_by_the_test(tmp_path: Path) -> None:
    subprocess.run(
        [
            LLAMA_PYTHON,
            str(ROOT / "tests" / "real_llama" / "write_tiny_gguf.py"),
            str(tmp_path / "m.gguf"),
        ],
        check=True,
        timeout=120,
    )

    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
