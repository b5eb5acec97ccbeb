"""End to end with the official OpenAI SDK: SDK → gateway → auth + providers →
fake Ollama, every service a real process."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from openai.types.shared_params import ResponseFormatJSONSchema

from tests.fakes import FakeOllama
from tests.stack import Stack, free_ports, start_stack

MODEL = "ollama/llama3.2:latest"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def client(stack: Stack, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0) as c:
        yield c


def test_non_streaming_completion_returns_the_upstream_reply(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello from llama3.2:latest! You said: hi there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.completion_tokens > 0


def test_streaming_content_assembles_and_usage_comes_last(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Hello from llama3.2:latest! You said: hi there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_include_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_sampling_parameters_reach_ollama_as_options(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        temperature=0.3,
        top_p=0.9,
        max_tokens=42,
        stop=["END"],
        seed=7,
    )
    (request,) = ollama.chat_requests
    assert request.body is not None
    assert request.body["model"] == "llama3.2:latest"
    assert request.body["messages"] == [{"role": "user", "content": "hi there"}]
    options = request.body["options"]
    assert options["temperature"] == pytest.approx(0.3)
    assert options["top_p"] == pytest.approx(0.9)
    assert (options["num_predict"], options["stop"], options["seed"]) == (42, ["END"], 7)


def test_tool_calls_come_back_in_openai_shape(client: openai.OpenAI) -> None:
    tools: list[ChatCompletionToolParam] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    reply = client.chat.completions.create(
        model="ollama/tooly:latest",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=tools,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"Paris"}'


def test_bare_model_name_resolves_when_one_provider_has_it(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="llama3.2", messages=HELLO)
    assert reply.model == MODEL


def test_x_api_key_header_is_accepted(stack: Stack, api_key: str) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"X-API-Key": api_key},
        json={"model": MODEL, "messages": HELLO},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]


def test_bad_key_is_an_authentication_error(stack: Stack) -> None:
    with (
        openai.OpenAI(
            base_url=f"{stack.base_url}/v1", api_key="mk-not-a-real-key", max_retries=0
        ) as bad,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        bad.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_revoked_key_is_refused_at_once(stack: Stack) -> None:
    created = orjson.loads(stack.marie("keys", "create", "--name", "short", "--json").stdout)
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=created["key"], max_retries=0) as c:
        c.chat.completions.create(model=MODEL, messages=HELLO)
        assert stack.marie("keys", "revoke", created["id"]).returncode == 0
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model=MODEL, messages=HELLO)


def test_missing_key_is_401_with_openai_envelope(stack: Stack) -> None:
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert error["message"]


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="ollama/nope:latest", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert "nope" in caught.value.message


def test_malformed_body_is_bad_request_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[cast(ChatCompletionMessageParam, {"role": "wizard", "content": "hi"})],
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "messages[0].role"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": []}', "messages"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}',
            "temperature",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
        (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', "messages[0]"),
    ],
)
def test_bad_bodies_are_400_with_envelope(
    stack: Stack, api_key: str, body: bytes, param: str | None
) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_extra_fields_are_ignored(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        extra_body={"vendor_thing": {"x": 1}, "parallel_tool_calls": False},
    )
    assert reply.choices[0].message.content


def test_mid_stream_upstream_error_arrives_as_an_error_event(stack: Stack, api_key: str) -> None:
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "ollama/broken:latest", "messages": HELLO, "stream": True},
    ) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "upstream_error" in events[-2]
    assert any('"content"' in e for e in events[:-2])


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and "ollama/nomic-embed-text:latest" in ids
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "ollama")


def test_retrieving_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ollama/nope:latest")


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(
        model="ollama/nomic-embed-text:latest", input=["alpha", "beta"]
    )
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 768
    assert reply.data[0].embedding != reply.data[1].embedding


def test_embeddings_take_an_input_type_and_refuse_an_unknown_one(
    client: openai.OpenAI, stack: Stack, api_key: str
) -> None:
    # Accepted in every spelling retrieval uses (the fake Ollama is configured
    # with no embedding instructions, so the vectors are the same).
    for input_type in ("query", "search_query", "document", "passage", "search_document"):
        reply = client.embeddings.create(
            model="ollama/nomic-embed-text:latest",
            input="alpha",
            extra_body={"input_type": input_type},
        )
        assert len(reply.data[0].embedding) == 768

    bad = httpx.post(
        f"{stack.base_url}/v1/embeddings",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "ollama/nomic-embed-text:latest", "input": "x", "input_type": "classify"},
    )

    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "input_type"
    assert error["type"] == "invalid_request_error"


def test_unknown_route_is_404_envelope(stack: Stack) -> None:
    r = httpx.get(f"{stack.base_url}/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["message"]


def test_marie_up_reports_each_providers_health(stack: Stack) -> None:
    assert re.search(r"^  ollama +healthy, \d+ models$", stack.log(), re.MULTILINE)


def test_health_endpoints(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"providers": True, "auth": True, "memory": True},
    }


def test_client_disconnect_closes_the_upstream_stream(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    before = ollama.disconnects
    stream = client.chat.completions.create(
        model="ollama/endless:latest",
        messages=HELLO,
        stream=True,
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    assert ollama.wait_for_disconnect(timeout=10, count=before + 1)
    assert ollama.wait_for_active_streams(0, timeout=10)


def test_client_leaving_a_whole_reply_closes_the_upstream(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    """A non-streaming request is one unary CreateChatCompletion call: a client
    that gives up waiting still stops the generation upstream."""
    before = ollama.disconnects
    impatient = client.with_options(timeout=1.5, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="ollama/endless:latest", messages=HELLO)
    assert ollama.wait_for_disconnect(timeout=10, count=before + 1)
    assert ollama.wait_for_active_streams(0, timeout=10)


def test_upstream_down_is_a_server_error(tmp_path: Path) -> None:
    (closed_port,) = free_ports(1)
    down = start_stack(tmp_path / "down", f"http://127.0.0.1:{closed_port}")
    try:
        key = down.create_key("down")
        c = openai.OpenAI(base_url=f"{down.base_url}/v1", api_key=key, max_retries=0)
        with c, pytest.raises(openai.InternalServerError) as caught:
            c.chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.status_code == 503
        # The client gets plain words and the request id, not internal addresses...
        rid = caught.value.response.headers["x-request-id"]
        assert caught.value.message.endswith(
            f"The provider 'ollama' is not reachable right now for model '{MODEL}'"
            f" (request id {rid})."
        )
        assert str(closed_port) not in caught.value.response.text
        # ...which the log line with that request id names, for the operator.
        failures = [
            line for line in down.log().splitlines() if rid in line and "upstream failure" in line
        ]
        assert failures and f"127.0.0.1:{closed_port}" in failures[0]
        # `marie up` told the person at the terminal, naming the URL.
        assert re.search(
            rf"^  ollama +NOT AVAILABLE \(at http://127\.0\.0\.1:{closed_port}\)",
            down.log(),
            re.MULTILINE,
        )
    finally:
        assert down.stop() == 0


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
            "tag",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0]", "need content"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop", "at most 4"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed", "less than"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "not a name"}}],
            },
            "tools[0].function.name",
            "pattern",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "not in tools",
        ),
    ],
)
def test_bad_body_errors_point_at_the_mistake(
    stack: Stack, api_key: str, body: dict[str, object], param: str | None, says: str
) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": MODEL, **body},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert says in error["message"]


def test_embeddings_reject_empty_strings(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="ollama/nomic-embed-text:latest", input=["ok", ""])
    assert caught.value.param == "input[1]"


def test_embeddings_take_at_most_2048_inputs_of_any_length(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="ollama/nomic-embed-text:latest", input=["x"] * 2049)
    assert caught.value.param == "input"
    long_one = client.embeddings.create(model="ollama/nomic-embed-text:latest", input="x" * 5000)
    assert len(long_one.data) == 1


def test_key_without_chat_scope_is_forbidden(stack: Stack) -> None:
    key = stack.create_key("reader", "--scope", "models:read")
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0) as c:
        assert MODEL in [m.id for m in c.models.list()]
        with pytest.raises(openai.PermissionDeniedError) as caught:
            c.chat.completions.create(model=MODEL, messages=HELLO)
    assert "chat" in caught.value.message


def test_key_limited_to_some_models_sees_and_uses_only_those(stack: Stack) -> None:
    key = stack.create_key("narrow", "--model", "ollama/qwen2.5:0.5b")
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0) as c:
        assert [m.id for m in c.models.list()] == ["ollama/qwen2.5:0.5b"]
        c.chat.completions.create(model="ollama/qwen2.5:0.5b", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model=MODEL, messages=HELLO)
        # A bare name is checked against the model it resolves to.
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="llama3.2", messages=HELLO)
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve(MODEL)


@pytest.mark.parametrize("model", ["ollama/endless:latest", "ollama/slowstart:latest"])
def test_client_leaving_a_non_streaming_request_closes_the_upstream(
    stack: Stack, api_key: str, ollama: FakeOllama, model: str
) -> None:
    """Whether the upstream is generating or has not answered yet, a client that
    gives up stops the work upstream."""
    before = ollama.disconnects
    with (
        openai.OpenAI(
            base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0, timeout=0.5
        ) as c,
        pytest.raises(openai.APITimeoutError),
    ):
        c.chat.completions.create(model=model, messages=HELLO)
    assert ollama.wait_for_disconnect(timeout=10, count=before + 1)


def test_client_errors_are_not_logged_as_server_errors(stack: Stack, api_key: str) -> None:
    marker = "zz-unknown-model-for-log-check"
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": f"ollama/{marker}", "messages": HELLO},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert r.status_code == 404
    request_id = r.headers["x-request-id"]
    lines = [line for line in stack.log().splitlines() if request_id in line]
    assert lines, "the request left no log line"
    assert not [line for line in lines if '"level":"error"' in line]


def test_the_request_id_follows_the_call_into_every_service(stack: Stack, api_key: str) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO},
        headers={"Authorization": f"Bearer {api_key}", "X-Request-Id": "trace-me-42"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-me-42"

    def services() -> set[str]:
        return {
            orjson.loads(line)["service"]
            for line in stack.log().splitlines()
            if line.startswith("{") and '"request_id":"trace-me-42"' in line
        }

    # The gateway's access line is written once the answer is sent, and reaches
    # marie up's log through a pipe: it may come a moment after the answer.
    deadline = time.monotonic() + 10
    while not {"gateway", "providers"} <= services() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {"gateway", "providers"} <= services()


def test_a_tool_round_trip_reaches_ollama_in_its_own_shape(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    tools: list[ChatCompletionToolParam] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"maxItems": 3}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    reply = client.chat.completions.create(
        model="ollama/tooly:latest", messages=messages, tools=tools
    )
    assert reply.choices[0].message.content  # the model answers the tool result in text

    (request,) = ollama.chat_requests
    assert request.body is not None
    sent = request.body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C and sunny", "tool_name": "get_weather"},
    ]
    (tool,) = sent["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "get_weather"
    assert tool["function"]["parameters"]["properties"]["days"] == {"maxItems": 3}


def test_json_schema_response_format_becomes_ollama_format(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    }
    as_schema: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "count", "schema": schema},
    }
    client.chat.completions.create(model=MODEL, messages=HELLO, response_format=as_schema)
    client.chat.completions.create(
        model=MODEL, messages=HELLO, response_format={"type": "json_object"}
    )
    first, second = ollama.chat_requests
    assert first.body is not None and second.body is not None
    assert first.body["format"] == schema
    assert second.body["format"] == "json"


def test_image_parts_reach_ollama_as_base64_images(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
        "awAAAABJRU5ErkJggg=="
    )
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
                ],
            }
        ],
    )
    (request,) = ollama.chat_requests
    assert request.body is not None
    (message,) = request.body["messages"]
    assert message["content"] == "What is this?"
    assert message["images"] == [pixel]


def test_remote_image_urls_are_refused_with_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                    ],
                }
            ],
        )
    assert "image" in caught.value.message.lower()


def test_streamed_tool_calls_follow_openai_delta_shape(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="ollama/tooly:latest",
            messages=[{"role": "user", "content": "weather in Paris?"}],
            stream=True,
        )
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1
    (call,) = calls
    assert call.index == 0 and call.type == "function"
    assert call.id is not None and call.id.startswith("call_")
    assert call.function is not None
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Paris"}')
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_unknown_and_revoked_keys_get_the_same_answer(stack: Stack) -> None:
    from marie_kit.apikeys import generate_key  # noqa: PLC0415

    created = orjson.loads(stack.marie("keys", "create", "--name", "gone", "--json").stdout)
    assert stack.marie("keys", "revoke", created["id"]).returncode == 0
    answers = set()
    for key in ("mk-malformed", generate_key(), created["key"]):
        r = httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        answers.add((r.status_code, r.content))
    assert len(answers) == 1
    ((status, _),) = answers
    assert status == 401


def test_an_absurdly_long_model_id_is_a_400_not_a_transport_error(
    stack: Stack, api_key: str
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "m" * 10_000, "messages": HELLO},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(f"{stack.base_url}/v1/models/{'m' * 10_000}", headers=headers)
    # The path parameter as the OpenAPI document names it.
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_id"
