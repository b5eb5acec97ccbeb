"""End to end with the official OpenAI SDK and LangChain: legacy text completions
(`/v1/completions`), log probabilities, token-array embeddings. SDK → gateway →
providers → fake Ollama, OpenAI-compatible, Hugging Face router and Anthropic
servers speaking their wire formats; every service a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import tiktoken
from langchain_openai import OpenAIEmbeddings

from tests.fakes import FakeModel, FakeOllama
from tests.fakes.anthropic_server import FakeAnthropic, FakeClaude
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI, fake_vector
from tests.fakes.upstream import piece_logprob, words
from tests.stack import ROOT, Stack, start_stack

KEY = "upstream-test-key"
LLAMA = "ollama/llama3.2:latest"
CODER = FakeModel(name="coder:latest", capabilities=["completion", "insert"])
ENDLESS = FakeModel(name="endless:latest", endless=True, chunk_delay=0.02)
HUB_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Upstreams:
    def __init__(self) -> None:
        self.ollama = FakeOllama()
        self.ollama.add_model(CODER)
        self.ollama.add_model(ENDLESS)
        self.oai = FakeOpenAI(
            [
                FakeChatModel("gpt-fake", reply="Hello from the OpenAI-compatible fake"),
                FakeChatModel("embedder", embedding_dimension=6),
            ],
            api_key=KEY,
        )
        self.hf = FakeOpenAI([FakeChatModel(HUB_MODEL, reply="hub")], api_key=KEY, huggingface=True)
        self.claude = FakeAnthropic(
            [FakeClaude("claude-fake", reply="Hello from Claude")], api_key=KEY
        )


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    running = Upstreams()
    with running.ollama, running.oai, running.hf, running.claude:
        yield running


@pytest.fixture(scope="module")
def completions_stack(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("completions")
    config = data_dir / "marie.yaml"
    config.write_text(
        f"""\
providers:
  ollama: {{type: ollama, base_url: "{upstreams.ollama.base_url}"}}
  oai:    {{type: openai, base_url: "{upstreams.oai.base_url}/v1", api_key_env: FAKE_OAI_KEY}}
  hf:     {{type: huggingface, base_url: "{upstreams.hf.base_url}/v1", api_key_env: FAKE_HF_KEY}}
  claude: {{type: anthropic, base_url: "{upstreams.claude.base_url}", api_key_env: FAKE_CLAUDE_KEY}}
routing:
  retries: 0
"""
    )
    running = start_stack(
        data_dir,
        upstreams.ollama.base_url,
        MARIE_CONFIG=str(config),
        FAKE_OAI_KEY=KEY,
        FAKE_HF_KEY=KEY,
        FAKE_CLAUDE_KEY=KEY,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(completions_stack: Stack) -> str:
    return completions_stack.create_key("completions")


@pytest.fixture(scope="module")
def client(completions_stack: Stack, key: str) -> Iterator[openai.OpenAI]:
    base_url = f"{completions_stack.base_url}/v1"
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as c:
        yield c


def said(model: str, prompt: str) -> str:
    """What the fakes answer to `prompt` by default."""
    return f"Hello from {model}! You said: {prompt}"


# -- /v1/completions on Ollama (/api/generate) -----------------------------------


def test_a_plain_completion_continues_the_prompt_raw_on_ollama(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.ollama.reset()
    reply = client.completions.create(
        model=LLAMA, prompt="Once upon a time", max_tokens=50, temperature=0.5, seed=7, user="u1"
    )
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == LLAMA
    assert [c.text for c in reply.choices] == [said("llama3.2:latest", "Once upon a time")]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].index == 0
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    sent = upstreams.ollama.generate_requests[-1].body
    # Raw: the prompt is text to continue, not a user turn for the chat template.
    assert sent["prompt"] == "Once upon a time" and sent["raw"] is True
    assert sent["options"] == {"temperature": 0.5, "num_predict": 50, "seed": 7}
    assert "suffix" not in sent


def test_a_list_of_prompts_is_answered_as_choices_in_order(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=LLAMA, prompt=["first one", "second one"], n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [
        said("llama3.2:latest", "first one"),
        said("llama3.2:latest", "first one"),
        said("llama3.2:latest", "second one"),
        said("llama3.2:latest", "second one"),
    ]
    assert reply.usage is not None
    # Four generations: the usage is theirs together.
    assert reply.usage.prompt_tokens == 2 * 2 + 2 * 2


def test_streaming_sends_text_completion_chunks_then_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=LLAMA,
            prompt=["tell me", "and you"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: said("llama3.2:latest", "tell me"), 1: said("llama3.2:latest", "and you")}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_echo_puts_the_prompt_before_the_completion(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=LLAMA, prompt="Echo me.", echo=True)
    assert whole.choices[0].text == "Echo me." + said("llama3.2:latest", "Echo me.")
    streamed = client.completions.create(model=LLAMA, prompt="Echo me.", echo=True, stream=True)
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == "Echo me." + said("llama3.2:latest", "Echo me.")


def test_stop_sequences_end_the_completion_before_them(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    reply = client.completions.create(model=LLAMA, prompt="hey", stop=["! You"])
    assert reply.choices[0].text == "Hello from llama3.2:latest"
    assert reply.choices[0].finish_reason == "stop"
    assert upstreams.ollama.generate_requests[-1].body["options"]["stop"] == ["! You"]


def test_max_tokens_cuts_the_completion_with_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=LLAMA, prompt="hey", max_tokens=2)
    assert reply.choices[0].text == "Hello from"
    assert reply.choices[0].finish_reason == "length"


def test_a_suffix_goes_to_models_that_fill_in_the_middle(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    reply = client.completions.create(
        model="ollama/coder:latest", prompt="def f(", suffix="  return x"
    )
    assert reply.choices[0].text == said("coder:latest", "def f(")
    sent = upstreams.ollama.generate_requests[-1].body
    # The model's template places prompt and suffix: no raw mode.
    assert sent["suffix"] == "  return x" and "raw" not in sent


def test_a_suffix_for_a_model_without_fill_in_the_middle_is_400_naming_suffix(
    completions_stack: Stack, key: str
) -> None:
    response = httpx.post(
        f"{completions_stack.base_url}/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": LLAMA, "prompt": "def f(", "suffix": "return x"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "suffix"
    assert "does not support insert" in error["message"]


def test_a_client_that_leaves_a_completion_stream_stops_the_generation(
    completions_stack: Stack, key: str, upstreams: Upstreams
) -> None:
    before = upstreams.ollama.disconnects
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            f"{completions_stack.base_url}/v1/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "ollama/endless:latest", "prompt": "go on", "stream": True},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert upstreams.ollama.wait_for_disconnect(timeout=5, count=before + 1)


def test_the_official_node_sdk_creates_completions(completions_stack: Stack, key: str) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the Node SDK test needs node and npm on PATH")
    folder = ROOT / "tests" / "node_completions"
    if not (folder / "node_modules" / "openai").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=folder, check=True, timeout=300
        )
    done = subprocess.run(
        [node, "completions.mjs"],
        check=False,
        cwd=folder,
        env={
            "PATH": str(Path(node).parent),
            "MARIE_BASE_URL": f"{completions_stack.base_url}/v1",
            "MARIE_API_KEY": key,
            "MARIE_MODEL": LLAMA,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["plain"]["object"] == "text_completion"
    assert out["plain"]["id"].startswith("cmpl-")
    assert out["plain"]["text"] == said("llama3.2:latest", "Once upon")
    assert out["plain"]["usage"]["completion_tokens"] > 0
    assert out["list"] == [[0, said("llama3.2:latest", "one")], [1, said("llama3.2:latest", "two")]]
    assert out["streamed"]["text"] == said("llama3.2:latest", "streamed")
    assert out["streamed"]["finish"] == "stop"
    assert out["streamed"]["usage"]["prompt_tokens"] == 1
    assert out["echo"] == "Echo." + said("llama3.2:latest", "Echo.")
    assert out["stop"] == ["Hello from llama3.2:latest", "stop"]


def test_a_client_that_leaves_before_the_answer_stops_every_choice(
    completions_stack: Stack, key: str, upstreams: Upstreams
) -> None:
    before = upstreams.ollama.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{completions_stack.base_url}/v1/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "ollama/endless:latest", "prompt": ["a", "b"]},
            timeout=1.5,
        )
    # Two choices, two upstream generations: both stopped.
    assert upstreams.ollama.wait_for_disconnect(timeout=5, count=before + 2)


# -- /v1/completions on other providers ----------------------------------------------


def test_an_openai_compatible_upstream_gets_the_completion_as_is(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.oai.reset()
    reply = client.completions.create(
        model="oai/gpt-fake", prompt="Say it", suffix=" end", max_tokens=20, stop="XYZ", logprobs=2
    )
    assert reply.choices[0].text == "Hello from the OpenAI-compatible fake"
    sent = upstreams.oai.requests_to("/v1/completions")[-1].body
    assert sent["prompt"] == "Say it" and sent["suffix"] == " end"
    assert sent["max_tokens"] == 20 and sent["stop"] == ["XYZ"] and sent["logprobs"] == 2
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    pieces = words("Hello from the OpenAI-compatible fake")
    assert logprobs.tokens == pieces
    assert logprobs.token_logprobs == [piece_logprob(i) for i in range(len(pieces))]
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset == [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]


def test_an_openai_compatible_completion_streams(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="oai/gpt-fake", prompt="Say it", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == (
        "Hello from the OpenAI-compatible fake"
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("model", [f"hf/{HUB_MODEL}", "claude/claude-fake"])
def test_providers_without_text_completions_answer_400_naming_the_model(
    client: openai.OpenAI, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt="hi")
    assert caught.value.param == "model"
    assert "has no text completions" in caught.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": LLAMA}, "prompt"),
        ({"model": LLAMA, "prompt": ""}, "prompt"),
        ({"model": LLAMA, "prompt": []}, "prompt"),
        ({"model": LLAMA, "prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"model": LLAMA, "prompt": "hi", "n": 17}, "n"),
        ({"model": LLAMA, "prompt": ["a"] * 9, "n": 2}, "n"),
        ({"model": LLAMA, "prompt": "hi", "best_of": 2}, "best_of"),
        ({"model": LLAMA, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": LLAMA, "prompt": "hi", "echo": "yes"}, "echo"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(
    completions_stack: Stack, key: str, body: dict[str, object], param: str
) -> None:
    response = httpx.post(
        f"{completions_stack.base_url}/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json=body,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- log probabilities -----------------------------------------------------------------


def _assert_chat_logprobs(content: object, reply: str, top: int) -> None:
    pieces = words(reply) if "OpenAI" in reply else None
    assert isinstance(content, list)
    tokens = [entry.token for entry in content]
    assert "".join(tokens) == reply
    if pieces is not None:
        assert tokens == pieces
    assert [entry.logprob for entry in content] == [piece_logprob(i) for i in range(len(tokens))]
    assert all(len(entry.top_logprobs) == top for entry in content)
    assert all(bytes(entry.bytes or []) == entry.token.encode() for entry in content)


@pytest.mark.parametrize("model", [LLAMA, "oai/gpt-fake"])
def test_chat_logprobs_come_in_openai_shape_whole_and_streamed(
    client: openai.OpenAI, upstreams: Upstreams, model: str
) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "rate me"}
    ]
    reply = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=2
    )
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].logprobs is not None
    _assert_chat_logprobs(reply.choices[0].logprobs.content, text, 2)
    streamed = list(
        client.chat.completions.create(
            model=model, messages=messages, logprobs=True, top_logprobs=2, stream=True
        )
    )
    content = [
        entry
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    _assert_chat_logprobs(content, text, 2)
    if model == LLAMA:
        sent = upstreams.ollama.chat_requests[-1].body
    else:
        sent = upstreams.oai.requests_to("/v1/chat/completions")[-1].body
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2


def test_chat_without_logprobs_has_none(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=LLAMA, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].logprobs is None


def test_legacy_logprobs_from_ollama_count_offsets_after_an_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=LLAMA, prompt="Go.", logprobs=1, echo=True)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == said("llama3.2:latest", "Go.")
    assert choice.logprobs.text_offset is not None
    # The first generated token starts right after the echoed prompt.
    assert choice.logprobs.text_offset[0] == len("Go.")
    assert choice.logprobs.top_logprobs is not None
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs)


def test_logprobs_from_anthropic_are_400_naming_logprobs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="claude/claude-fake",
            messages=[{"role": "user", "content": "hi"}],
            logprobs=True,
        )
    assert caught.value.param == "logprobs"


def test_top_logprobs_without_logprobs_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=LLAMA, messages=[{"role": "user", "content": "hi"}], top_logprobs=2
        )
    assert caught.value.param == "top_logprobs"


# -- token-array embeddings (LangChain's default) ----------------------------------------


@pytest.fixture
def offline_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's encodings are downloaded at first use, which this machine cannot do;
    a byte-level encoding makes LangChain tokenize offline all the same (which ids
    it sends does not matter to Marie, only that it sends ids)."""
    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={},
    )
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _model: encoding)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda _name: encoding)


@pytest.mark.usefixtures("offline_tiktoken")
def test_langchain_default_embeddings_pass_token_arrays_through(
    completions_stack: Stack, key: str, upstreams: Upstreams
) -> None:
    embeddings = OpenAIEmbeddings(
        model="oai/embedder",
        base_url=f"{completions_stack.base_url}/v1",
        api_key=key,  # type: ignore[arg-type]
    )
    vectors = embeddings.embed_documents(["hello world", "hi"])
    sent = upstreams.oai.requests_to("/v1/embeddings")[-1].body
    # LangChain sent token ids, and the upstream received them as they were.
    assert sent["input"] == [list(b"hello world"), list(b"hi")]
    assert len(vectors) == 2
    expected = fake_vector(" ".join(map(str, b"hi")), 6)
    assert vectors[1] == pytest.approx(expected, abs=1e-6)


@pytest.mark.usefixtures("offline_tiktoken")
def test_langchain_default_embeddings_on_ollama_get_a_400_naming_the_setting(
    completions_stack: Stack, key: str, upstreams: Upstreams
) -> None:
    embeddings = OpenAIEmbeddings(
        model="ollama/nomic-embed-text:latest",
        base_url=f"{completions_stack.base_url}/v1",
        api_key=key,  # type: ignore[arg-type]
        max_retries=0,
    )
    before = len(upstreams.ollama.embed_requests)
    with pytest.raises(openai.BadRequestError) as caught:
        embeddings.embed_documents(["hello world"])
    assert caught.value.param == "input"
    assert "check_embedding_ctx_length=False" in caught.value.message
    assert len(upstreams.ollama.embed_requests) == before
    # The setting the message names does work.
    texts = OpenAIEmbeddings(
        model="ollama/nomic-embed-text:latest",
        base_url=f"{completions_stack.base_url}/v1",
        api_key=key,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    ).embed_documents(["hello world"])
    assert len(texts[0]) == 768


def test_one_token_array_is_one_input(client: openai.OpenAI, upstreams: Upstreams) -> None:
    reply = client.embeddings.create(model="oai/embedder", input=[1, 2, 3])
    assert len(reply.data) == 1
    assert upstreams.oai.requests_to("/v1/embeddings")[-1].body["input"] == [[1, 2, 3]]


def test_negative_token_ids_are_400(completions_stack: Stack, key: str) -> None:
    response = httpx.post(
        f"{completions_stack.base_url}/v1/embeddings",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "oai/embedder", "input": [[1, -2]]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("input")


def test_usage_of_completions_is_recorded_for_the_key(completions_stack: Stack, key: str) -> None:
    client = openai.OpenAI(base_url=f"{completions_stack.base_url}/v1", api_key=key)
    client.completions.create(model=LLAMA, prompt="count me")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = httpx.get(
            f"{completions_stack.base_url}/api/usage",
            headers={"authorization": f"Bearer {key}"},
            params={"group_by": "model"},
        ).json()
        if any(group["group"] == LLAMA for group in report["groups"]):
            return
        time.sleep(0.2)
    pytest.fail(f"no usage recorded for {LLAMA}: {report}")
