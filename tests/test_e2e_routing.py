"""Routing that puts users first, end to end (every service a real process, fake
OpenAI-compatible upstreams speaking the wire protocol and failing on cue):
an open circuit, a provider without its key and an unreachable one are 503s
that name the provider and model; an upstream that cannot do a thing is a 4xx
with its reason; health shows each operation's circuit; a client leaving a
stream closes the upstream connection before the first token as after it;
what arrived before an upstream failure reaches the client before the error."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.fakes import FakeOllama
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.fakes.upstream import Cue
from tests.stack import Stack, free_ports, start_stack

KEY = "routing-test-key"
HELLO = [{"role": "user", "content": "hi there"}]
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
# Breaker settings of the stack: two failures in a row open a circuit for a minute.
BREAKER_FAILURES = 2
OPEN_SECONDS = 60


class Upstreams:
    def __init__(self) -> None:
        self.local = FakeOpenAI(
            [
                FakeChatModel("chat", reply="one two three four five six"),
                FakeChatModel("fragile", reply="fragile answered"),
                FakeChatModel("endless", endless=True, chunk_delay=0.02),
                # Cut after accepting a stream, in tests of its own: its circuit is its own.
                FakeChatModel("cut", reply="never said"),
            ],
            api_key=KEY,
        )
        self.hf = FakeOpenAI([FakeChatModel("org/model")], api_key=KEY, huggingface=True)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    running = Upstreams()
    with running.local, running.hf:
        yield running


@pytest.fixture(scope="module")
def routed(
    upstreams: Upstreams, ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("routing")
    config = data_dir / "marie.yaml"
    (dead_port,) = free_ports(1)
    config.write_text(
        f"""\
providers:
  local: {{type: openai, base_url: "{upstreams.local.base_url}/v1", api_key_env: FAKE_LOCAL_KEY}}
  hf:    {{type: huggingface, base_url: "{upstreams.hf.base_url}/v1", api_key_env: FAKE_HF_TOKEN}}
  gone:  {{type: openai, base_url: "http://127.0.0.1:{dead_port}/v1"}}
routing:
  retries: 0
  breaker_failures: {BREAKER_FAILURES}
  breaker_open_seconds: {OPEN_SECONDS}
  health_interval_seconds: 600
"""
    )
    # FAKE_HF_TOKEN is left unset: the hf provider has no key.
    running = start_stack(data_dir, ollama.base_url, MARIE_CONFIG=str(config), FAKE_LOCAL_KEY=KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(routed: Stack) -> str:
    return routed.create_key("routing")


@pytest.fixture(autouse=True)
def no_cues(upstreams: Upstreams) -> None:
    upstreams.local.reset()


def post(stack: Stack, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}{path}",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def chat(stack: Stack, key: str, model: str) -> httpx.Response:
    return post(stack, key, "/v1/chat/completions", {"model": model, "messages": HELLO})


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded ([DONE] as a string)."""
    out: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# 503s that name the provider and the model
# ---------------------------------------------------------------------------


def test_an_open_circuit_is_a_503_naming_the_provider_and_model_with_the_wait(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(*[Cue.status_error(500)] * BREAKER_FAILURES)
    failed = [chat(routed, key, "local/fragile") for _ in range(BREAKER_FAILURES)]

    refused = chat(routed, key, "local/fragile")
    other = chat(routed, key, "local/chat")

    assert [r.status_code for r in failed] == [502] * BREAKER_FAILURES
    assert refused.status_code == 503
    error = error_of(refused)
    assert error["code"] == "provider_unavailable"
    assert error["type"] == "server_error"
    assert "'local'" in error["message"]
    assert "'local/fragile'" in error["message"]
    assert "A Marie service" not in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= OPEN_SECONDS
    assert f"retry in {refused.headers['retry-after']} s" in error["message"]
    # Only that model's chat is refused.
    assert other.status_code == 200


def test_health_shows_the_open_circuit_and_calls_the_provider_degraded(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(*[Cue.status_error(500)] * BREAKER_FAILURES)
    for _ in range(BREAKER_FAILURES):
        chat(routed, key, "local/fragile")

    response = httpx.get(
        f"{routed.base_url}/api/models/providers/health",
        headers={"authorization": f"Bearer {key}"},
    )
    document = httpx.get(f"{routed.base_url}/openapi.json").json()

    assert response.status_code == 200
    health = response.json()
    schema = {"$ref": "#/components/schemas/ProvidersHealth", **document}
    jsonschema.validate(health, schema, cls=jsonschema.Draft202012Validator)
    local = health["local"]
    assert local["status"] == "degraded"
    assert local["available"] is True
    assert "local/fragile (chat) circuit open" in local["error"]
    [fragile] = [d for d in local["deployments"] if d["model"] == "local/fragile"]
    assert fragile["operation"] == "chat"
    assert fragile["circuit"] == "open"
    assert fragile["consecutive_failures"] >= BREAKER_FAILURES
    assert fragile["retry_at"] is not None
    assert fragile["max_background_concurrency"] == 1


def test_a_provider_without_its_key_names_the_variable_to_set(routed: Stack, key: str) -> None:
    response = chat(routed, key, "hf/org/model")

    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "provider_unavailable"
    assert "'hf'" in error["message"]
    assert "FAKE_HF_TOKEN" in error["message"]


def test_an_unreachable_provider_is_named(routed: Stack, key: str) -> None:
    response = chat(routed, key, "gone/some-model")

    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "provider_unavailable"
    assert "The provider 'gone' is not reachable right now" in error["message"]
    assert "'gone/some-model'" in error["message"]


# ---------------------------------------------------------------------------
# An upstream that cannot do a thing: a 4xx with its reason
# ---------------------------------------------------------------------------


def test_embeddings_on_a_chat_only_server_are_a_400_with_the_reason(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(*[Cue.status_error(501, message=NO_EMBEDDINGS)] * 4)

    refused = [
        post(routed, key, "/v1/embeddings", {"model": "local/chat", "input": "x"}) for _ in range(4)
    ]
    chatted = chat(routed, key, "local/chat")

    for response in refused:
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "unsupported_by_provider"
        assert "Start it with `--embeddings`" in error["message"]
    # Never retried, and the chat of the same model goes on.
    assert len(upstreams.local.requests_to("/v1/embeddings")) == 4
    assert chatted.status_code == 200


def test_an_input_over_the_batch_size_is_a_400_context_length_exceeded(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    too_large = (
        "input (513 tokens) is too large to process. increase the physical batch size"
        " (current batch size: 512)"
    )
    upstreams.local.fail_next(Cue.status_error(500, message=too_large))

    response = post(routed, key, "/v1/embeddings", {"model": "local/chat", "input": "long"})

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded"
    assert too_large in error["message"]


# ---------------------------------------------------------------------------
# Streams: the client leaving closes the upstream; partial answers come first
# ---------------------------------------------------------------------------


LEAVING = {
    "chat-stream": (
        "/v1/chat/completions",
        {"model": "local/chat", "messages": HELLO, "stream": True},
    ),
    "chat-whole": ("/v1/chat/completions", {"model": "local/chat", "messages": HELLO}),
    "completions-stream": (
        "/v1/completions",
        {"model": "local/chat", "prompt": "x", "stream": True},
    ),
    "responses-stream": ("/v1/responses", {"model": "local/chat", "input": "hi", "stream": True}),
    "messages-stream": (
        "/v1/messages",
        {"model": "local/chat", "max_tokens": 16, "messages": HELLO, "stream": True},
    ),
}


@pytest.mark.parametrize(
    "cue",
    # The upstream thinks (a long prompt being read) before its headers, or after them.
    [Cue.slow_first(20), Cue.slow_first_chunk(20)],
    ids=["before-headers", "after-headers"],
)
@pytest.mark.parametrize("endpoint", list(LEAVING))
def test_a_client_leaving_before_the_first_token_closes_the_upstream_at_once(
    routed: Stack, key: str, upstreams: Upstreams, cue: Cue, endpoint: str
) -> None:
    # A request just before leaves a connection to the upstream pooled: the
    # call goes on it, as it does under load.
    assert chat(routed, key, "local/chat").status_code == 200
    upstreams.local.reset()
    upstreams.local.fail_next(cue)
    path, payload = LEAVING[endpoint]
    body = json.dumps(payload).encode()
    upstream_path = "/v1/completions" if path == "/v1/completions" else "/v1/chat/completions"
    host, port = routed.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: marie\r\n"
            b"authorization: Bearer " + key.encode() + b"\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        wait_for(lambda: bool(upstreams.local.requests_to(upstream_path)), 5)
        time.sleep(0.5)
        client.setblocking(False)
        if cue.kind == "slow_first_chunk" and endpoint.endswith("-stream"):
            # The upstream accepted the stream: its answer has started, with
            # no event yet.
            head = client.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        else:
            # Nothing has come back: the gateway answers with the first chunk.
            with pytest.raises(BlockingIOError):
                client.recv(1)
        left = time.monotonic()

    assert upstreams.local.wait_for_disconnect(1, timeout=5)
    assert time.monotonic() - left < 3


def test_a_client_leaving_after_the_first_token_closes_the_upstream(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    body = {"model": "local/endless", "messages": HELLO, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{routed.base_url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
        ) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        left = time.monotonic()
        response.close()

    assert upstreams.local.wait_for_disconnect(1, timeout=5)
    assert time.monotonic() - left < 3


def test_what_arrived_before_an_upstream_failure_reaches_the_client_first(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(Cue.die_after(3))

    response = post(
        routed,
        key,
        "/v1/chat/completions",
        {"model": "local/chat", "messages": HELLO, "stream": True},
    )

    assert response.status_code == 200
    payloads = events(response)
    assert payloads[-1] == "[DONE]"
    *chunks, failure, _ = payloads
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "one two three"
    assert failure["error"]["code"] == "upstream_error"
    assert "'local'" in failure["error"]["message"]


def test_a_text_completion_stream_keeps_its_partial_text_too(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(Cue.die_after(2))

    response = post(
        routed,
        key,
        "/v1/completions",
        {"model": "local/chat", "prompt": "count", "stream": True},
    )

    assert response.status_code == 200
    *chunks, failure, done = events(response)
    assert done == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "one two"
    assert failure["error"]["code"] == "upstream_error"


def test_a_failed_response_keeps_the_text_that_had_arrived(
    routed: Stack, key: str, upstreams: Upstreams
) -> None:
    upstreams.local.fail_next(Cue.die_after(3))

    response = post(
        routed, key, "/v1/responses", {"model": "local/chat", "input": "count", "stream": True}
    )
    payloads = [p for p in events(response) if isinstance(p, dict)]
    kinds = [p["type"] for p in payloads]
    stored = httpx.get(
        f"{routed.base_url}/v1/responses/{payloads[0]['response']['id']}",
        headers={"authorization": f"Bearer {key}"},
    )

    deltas = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
    assert deltas == "one two three"
    assert kinds[-2:] == ["error", "response.failed"]
    failed = payloads[-1]["response"]
    assert failed["status"] == "failed"
    [message] = failed["output"]
    assert message["status"] == "incomplete"
    assert message["content"][0]["text"] == "one two three"
    assert stored.status_code == 200
    assert stored.json()["output"] == failed["output"]


#: Each streamed API, as called on the "cut" model.
CUT_STREAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"messages": HELLO}),
    "completions": ("/v1/completions", {"prompt": "count"}),
    "responses": ("/v1/responses", {"input": "count"}),
    "messages": ("/v1/messages", {"max_tokens": 16, "messages": HELLO}),
}


@pytest.mark.parametrize("endpoint", list(CUT_STREAMS))
def test_a_stream_cut_after_the_upstream_accepted_it_ends_with_an_error_event(
    routed: Stack, key: str, upstreams: Upstreams, endpoint: str
) -> None:
    # The answer started when the upstream accepted the request (as OpenAI's
    # own streams do): a failure before the first token is an error event of
    # that answer, as one after it is.
    assert chat(routed, key, "local/cut").status_code == 200  # its circuit is closed
    upstreams.local.fail_next(Cue.die_after_head())
    path, body = CUT_STREAMS[endpoint]

    response = post(routed, key, path, {**body, "model": "local/cut", "stream": True})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response)
    if endpoint in ("chat", "completions"):
        assert payloads[-1] == "[DONE]"
        [failure, _] = payloads
        error = failure["error"]
        assert error["code"] == "upstream_error"
    elif endpoint == "responses":
        assert [p["type"] for p in payloads] == [
            "response.created",
            "response.in_progress",
            "error",
            "response.failed",
        ]
        failed = payloads[-1]["response"]
        assert failed["status"] == "failed"
        assert failed["model"] == "local/cut"
        stored = httpx.get(
            f"{routed.base_url}/v1/responses/{failed['id']}",
            headers={"authorization": f"Bearer {key}"},
        )
        assert stored.json()["status"] == "failed"
        error = failed["error"]
    else:
        [failure] = payloads
        assert failure["type"] == "error"
        error = failure["error"]
    assert "'local'" in error["message"]


@pytest.mark.parametrize("endpoint", list(CUT_STREAMS))
def test_a_stream_the_upstream_refuses_keeps_the_upstreams_status(
    routed: Stack, key: str, upstreams: Upstreams, endpoint: str
) -> None:
    # Not accepted: nothing has started, the answer is the upstream's status.
    refusal = "max_tokens is too large for this model"
    upstreams.local.fail_next(Cue.status_error(400, message=refusal, param="max_tokens"))
    path, body = CUT_STREAMS[endpoint]

    response = post(routed, key, path, {**body, "model": "local/cut", "stream": True})

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert refusal in response.json()["error"]["message"]
