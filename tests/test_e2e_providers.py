"""End to end with the official OpenAI SDK through the gateway to every kind of provider:
SDK → gateway → providers → fake OpenAI-compatible, Hugging Face router and
Anthropic servers (and fake Ollama), configured by a MARIE_CONFIG file, every
service a real process."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.fakes import FakeOllama
from tests.fakes.anthropic_server import FakeAnthropic, FakeClaude
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.fakes.upstream import Cue
from tests.stack import Stack, start_stack

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]
WEATHER: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
KEY = "upstream-test-key"
HUB_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class Upstreams:
    def __init__(self) -> None:
        self.oai = FakeOpenAI(
            [
                FakeChatModel("gpt-fake", reply="Hello from the OpenAI-compatible fake"),
                FakeChatModel(
                    "gpt-tools",
                    tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
                ),
                FakeChatModel("gpt-endless", endless=True, chunk_delay=0.02),
                FakeChatModel("flaky", reply="flaky answered"),
                FakeChatModel("embedder", embedding_dimension=6),
            ],
            api_key=KEY,
        )
        self.hf = FakeOpenAI(
            [
                FakeChatModel(
                    HUB_MODEL,
                    reply="Hello from the hub",
                    listing={"providers": [{"provider": "groq", "status": "live"}]},
                ),
                FakeChatModel(
                    "Qwen/Qwen2.5-7B-Instruct",
                    tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}],
                ),
            ],
            api_key=KEY,
            huggingface=True,
        )
        self.claude = FakeAnthropic(
            [
                FakeClaude("claude-fake", reply="Hello from Claude"),
                FakeClaude(
                    "claude-tools", tool_uses=[{"name": "get_weather", "input": {"city": "Rome"}}]
                ),
                FakeClaude("claude-endless", endless=True, chunk_delay=0.02),
            ],
            api_key=KEY,
        )


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    running = Upstreams()
    with running.oai, running.hf, running.claude:
        yield running


@pytest.fixture(scope="module")
def cloud_stack(
    upstreams: Upstreams, ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("cloud")
    config = data_dir / "marie.yaml"
    config.write_text(
        f"""\
providers:
  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}
  oai:    {{type: openai, base_url: "{upstreams.oai.base_url}/v1", api_key_env: FAKE_OAI_KEY}}
  hf:     {{type: huggingface, base_url: "{upstreams.hf.base_url}/v1", api_key_env: FAKE_HF_KEY}}
  claude: {{type: anthropic, base_url: "{upstreams.claude.base_url}", api_key_env: FAKE_CLAUDE_KEY}}
aliases:
  fast: [oai/flaky, claude/claude-fake]
  talky: [oai/gpt-endless, claude/claude-fake]
splits:
  ab: {{oai/gpt-fake: 50, claude/claude-fake: 50}}
routing:
  retries: 0
  first_token_timeout_seconds: 3
"""
    )
    running = start_stack(
        data_dir,
        ollama.base_url,
        MARIE_CONFIG=str(config),
        FAKE_OAI_KEY=KEY,
        FAKE_HF_KEY=KEY,
        FAKE_CLAUDE_KEY=KEY,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(cloud_stack: Stack) -> Iterator[openai.OpenAI]:
    key = cloud_stack.create_key("cloud")
    with openai.OpenAI(base_url=f"{cloud_stack.base_url}/v1", api_key=key, max_retries=0) as c:
        yield c


TEXT_MODELS = {
    "oai/gpt-fake": "Hello from the OpenAI-compatible fake",
    f"hf/{HUB_MODEL}": "Hello from the hub",
    "claude/claude-fake": "Hello from Claude",
}
TOOL_MODELS = {
    "oai/gpt-tools": ("call_fake0", '{"city": "Paris"}'),
    "hf/Qwen/Qwen2.5-7B-Instruct:fastest": ("call_fake0", '{"city": "Oslo"}'),
    "claude/claude-tools": ("toolu_fake0", '{"city": "Rome"}'),
}


@pytest.mark.parametrize("model", list(TEXT_MODELS))
def test_non_streaming_reply_finish_and_usage(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=HELLO)

    assert reply.model == model
    assert reply.choices[0].message.content == TEXT_MODELS[model]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("model", list(TEXT_MODELS))
def test_streaming_reply_finish_and_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT_MODELS[model]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("model", list(TOOL_MODELS))
def test_tool_calls_non_streaming(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=HELLO, tools=WEATHER)

    call_id, arguments = TOOL_MODELS[model]
    [call] = reply.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == (
        call_id,
        "get_weather",
        arguments,
    )
    assert reply.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", list(TOOL_MODELS))
def test_tool_calls_streaming(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(model=model, messages=HELLO, tools=WEATHER, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish

    call_id, arguments = TOOL_MODELS[model]
    assert calls == {0: {"id": call_id, "name": "get_weather", "arguments": arguments}}
    assert json.loads(calls[0]["arguments"])
    assert finish == "tool_calls"


def test_models_lists_every_provider_and_the_routed_names(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    alias = client.models.retrieve("fast")

    assert {"oai/gpt-fake", f"hf/{HUB_MODEL}", "claude/claude-fake", "fast", "ab"} <= ids
    # The curated Hugging Face list is there beside the router's live one.
    assert "hf/HuggingFaceH4/zephyr-7b-beta" in ids
    assert alias.id == "fast"
    assert alias.owned_by == "marie"
    assert alias.model_extra == {"routes_to": ["oai/flaky", "claude/claude-fake"]}


def test_an_alias_falls_back_before_the_first_token(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.oai.fail_next(Cue.status_error(503))

    reply = client.chat.completions.create(model="fast", messages=HELLO)

    assert reply.choices[0].message.content == "Hello from Claude"
    assert reply.model == "claude/claude-fake"


def test_an_alias_does_not_fall_back_once_output_started(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.oai.fail_next(Cue.die_after(1))
    before = len(upstreams.claude.requests_to("/v1/messages"))

    stream = client.chat.completions.create(model="fast", messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "flaky"
    assert len(upstreams.claude.requests_to("/v1/messages")) == before


def test_upstream_rate_limits_reach_the_client_as_429(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.claude.fail_next(Cue.status_error(429, retry_after="2"))

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="claude/claude-fake", messages=HELLO)

    assert caught.value.status_code == 429
    # The upstream's own Retry-After reaches the client.
    assert caught.value.response.headers["retry-after"] == "2"


def test_upstream_credential_failures_are_not_blamed_on_the_callers_key(
    client: openai.OpenAI, upstreams: Upstreams
) -> None:
    upstreams.oai.fail_next(Cue.status_error(401))

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="oai/gpt-fake", messages=HELLO)

    assert caught.value.status_code == 503
    assert not isinstance(caught.value, openai.AuthenticationError)


@pytest.mark.parametrize(
    ("model", "which"), [("oai/gpt-endless", "oai"), ("claude/claude-endless", "claude")]
)
def test_a_client_leaving_closes_the_upstream_request(
    client: openai.OpenAI, upstreams: Upstreams, model: str, which: str
) -> None:
    upstream = upstreams.oai if which == "oai" else upstreams.claude
    before = upstream.disconnects
    stream = client.chat.completions.create(model=model, messages=HELLO, stream=True)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()

    assert upstream.wait_for_disconnect(before + 1, timeout=10)


def test_embeddings_through_an_openai_compatible_provider(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="oai/embedder", input=["one", "two"])

    assert [len(d.embedding) for d in reply.data] == [6, 6]
    assert reply.model == "oai/embedder"


def test_a_split_gives_a_user_the_same_arm_every_time(client: openai.OpenAI) -> None:
    for user in ("alice", "bob", "carol"):
        models = {
            client.chat.completions.create(model="ab", messages=HELLO, user=user).model
            for _ in range(3)
        }
        assert len(models) == 1


def test_marie_up_reports_each_provider_healthy(cloud_stack: Stack) -> None:
    log = cloud_stack.log()

    for name, count in (("oai", 5), ("hf", 7), ("claude", 3)):
        assert re.search(rf"^  {name} +healthy, {count} models$", log, re.MULTILINE), log


def test_a_restricted_key_is_routed_only_where_it_may_go(
    cloud_stack: Stack, upstreams: Upstreams
) -> None:
    key = cloud_stack.create_key("claude-only", "--model", "claude/*")
    before = len(upstreams.oai.requests_to("/v1/chat/completions"))
    with openai.OpenAI(base_url=f"{cloud_stack.base_url}/v1", api_key=key, max_retries=0) as c:
        reply = c.chat.completions.create(model="fast", messages=HELLO)
        listed = {m.id: m for m in c.models.list()}

    assert reply.model == "claude/claude-fake"
    # The alias's first target is an upstream this key may not use: never asked.
    assert len(upstreams.oai.requests_to("/v1/chat/completions")) == before
    assert listed["fast"].model_extra == {"routes_to": ["claude/claude-fake"]}
    assert not any(i.startswith("oai/") for i in listed)


def test_a_key_allowed_none_of_an_alias_targets_gets_403(cloud_stack: Stack) -> None:
    key = cloud_stack.create_key("ollama-only", "--model", "ollama/*")
    with (
        openai.OpenAI(base_url=f"{cloud_stack.base_url}/v1", api_key=key, max_retries=0) as c,
        pytest.raises(openai.PermissionDeniedError),
    ):
        c.chat.completions.create(model="fast", messages=HELLO)


def test_routed_names_fit_the_documented_schemas(cloud_stack: Stack, client: openai.OpenAI) -> None:
    document = httpx.get(f"{cloud_stack.base_url}/openapi.json").json()
    headers = {"authorization": f"Bearer {client.api_key}"}
    models = httpx.get(f"{cloud_stack.base_url}/v1/models", headers=headers).json()
    catalogue = httpx.get(f"{cloud_stack.base_url}/api/models", headers=headers).json()

    schema = {"$ref": "#/components/schemas/OpenAIModelList", **document}
    jsonschema.validate(models, schema, cls=jsonschema.Draft202012Validator)
    assert {
        "id": "fast",
        "object": "model",
        "created": 0,
        "owned_by": "marie",
        "routes_to": ["oai/flaky", "claude/claude-fake"],
    } in models["data"]
    # The catalogue by provider has no place for names that belong to none.
    assert set(catalogue["models"]) == {"ollama", "oai", "hf", "claude"}
