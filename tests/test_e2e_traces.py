"""Traces end to end: the suite as real processes exporting OTLP/gRPC, and a
real Envoy exporting OTLP/HTTP, to a real OpenTelemetry Collector running the
compose profile's config (tests/otel_collector.py), which passes them on to a
receiver in the test (tests/otlp_receiver.py): one trace per request across
gateway, auth, memory and providers, GenAI attributes on model calls, the
extraction job linked to the turn that queued it, and no secret anywhere."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc

from tests.envoy import Envoy, start_envoy
from tests.fakes import FakeOllama
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.otel_collector import Collector
from tests.otlp_receiver import CLIENT, SERVER, OtlpReceiver, Span
from tests.stack import Stack, start_stack

CHAT_MODEL = "ollama/llama3.2:latest"
UPSTREAM_KEY = "sk-upstream-secret-for-traces"


@pytest.fixture(scope="module")
def hosted() -> Iterator[FakeOpenAI]:
    """A hosted OpenAI-compatible API whose key must never reach a trace."""
    models = [FakeChatModel("gpt-fake", reply="Hello from the hosted fake")]
    fake = FakeOpenAI(models, api_key=UPSTREAM_KEY)
    with fake:
        yield fake


@pytest.fixture(scope="module")
def traced(
    collector: Collector,
    ollama: FakeOllama,
    hosted: FakeOpenAI,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("marie-traces")
    config = data_dir / "marie.yaml"
    config.write_text(
        "providers:\n"
        f'  ollama: {{type: ollama, base_url: "{ollama.base_url}"}}\n'
        f'  oai: {{type: openai, base_url: "{hosted.base_url}/v1", api_key_env: FAKE_OAI_KEY}}\n'
    )
    running = start_stack(
        data_dir,
        ollama.base_url,
        MARIE_CONFIG=str(config),
        FAKE_OAI_KEY=UPSTREAM_KEY,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        # Export within 100 ms, not the default 5 s.
        OTEL_BSP_SCHEDULE_DELAY="100",
        MARIE_MEMORY_EMBEDDING_MODEL="ollama/nomic-embed-text:latest",
        MARIE_MEMORY_EXTRACTION_MODEL=CHAT_MODEL,
        MARIE_MEMORY_QUEUE_POLL_SECONDS="0.05",
        MARIE_GATEWAY_MEMORY="all",
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(traced: Stack) -> str:
    done = traced.marie("keys", "create", "--name", "traced", "--owner", "acme", "--json")
    assert done.returncode == 0, done.stderr
    value: str = orjson.loads(done.stdout)["key"]
    return value


def _api(stack: Stack, key: str) -> Callable[..., httpx.Response]:
    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return httpx.request(
            method, f"{stack.base_url}{path}", headers=headers, timeout=30, **kwargs
        )

    return call


def _traceparent() -> tuple[str, str]:
    """A caller's trace context (as Envoy or an instrumented client sends it)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, f"00-{trace_id}-{span_id}-01"


def _one(spans: list[Span], service: str, name: str) -> Span:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, sorted({(s.service, s.name) for s in spans}))
    return found[0]


def _by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def _assert_tree(spans: list[Span], root_parent: str) -> None:
    """Every span's parent is in the trace, except the root's (the caller's)."""
    ids = _by_id(spans)
    roots = [s for s in spans if s.parent_id not in ids]
    assert [(r.service, r.parent_id) for r in roots] == [("marie-gateway", root_parent)], [
        (r.service, r.name, r.parent_id) for r in roots
    ]


def _assert_no_secret(receiver: OtlpReceiver, *secret_values: str) -> None:
    for body in receiver.raw:
        for value in secret_values:
            assert value.encode() not in body
    for span in receiver.spans:
        for name in [*span.attributes, *(k for e in span.events for k in e.attributes)]:
            assert "authorization" not in name.lower() and "api_key" not in name.lower()


def _child_of(spans: list[Span], parent: Span, service: str, kind: int) -> Span:
    found = [
        s
        for s in spans
        if s.parent_id == parent.span_id and s.service == service and s.kind == kind
    ]
    assert len(found) == 1, (parent.name, service, [(s.service, s.name) for s in spans])
    return found[0]


def test_a_chat_is_one_trace_across_gateway_auth_memory_and_providers(
    traced: Stack, key: str, receiver: OtlpReceiver, ollama: FakeOllama
) -> None:
    trace_id, parent = _traceparent()
    reply = _api(traced, key)(
        "POST",
        "/v1/chat/completions",
        headers={"traceparent": parent, "x-request-id": "trace-chat-1"},
        json={
            "model": CHAT_MODEL,
            "user": "tracer",
            "max_tokens": 64,
            "temperature": 0.5,
            "messages": [{"role": "user", "content": "a secret-ish prompt"}],
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    # The answer names its trace beside its request id.
    assert reply.headers["x-trace-id"] == trace_id
    assert reply.headers["x-request-id"] == "trace-chat-1"

    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return {"marie-gateway", "marie-auth", "marie-memory", "marie-providers"} <= {
            s.service for s in mine
        } and any(s.name.startswith("chat ") for s in mine)

    receiver.wait_for(complete)
    time.sleep(0.3)  # the last batches (a span ends after its children)
    spans = receiver.trace(trace_id)
    _assert_tree(spans, parent.split("-")[2])

    request = _one(spans, "marie-gateway", "POST /v1/chat/completions")
    assert request.kind == SERVER
    assert request.attributes["marie.request_id"] == "trace-chat-1"
    assert request.attributes.get("http.route") == "/v1/chat/completions", " ".join(
        sorted(request.attributes)
    )

    # The key check: a gateway span whose gRPC client call is auth's server span.
    check = _one(spans, "marie-gateway", "gateway.check_key")
    ids = _by_id(spans)
    assert ids[check.parent_id] is request
    auth_client = _child_of(spans, check, "marie-gateway", CLIENT)
    auth_server = _child_of(spans, auth_client, "marie-auth", SERVER)
    assert auth_server.name == "/marie.auth.v1.AuthService/ValidateApiKey"
    assert auth_server.attributes["marie.request_id"] == "trace-chat-1"

    # The limits, counted in-process, ask no one: an event on the request's
    # span with their duration and operation, not a span of their own.
    assert not [s for s in spans if s.name == "gateway.limits"]
    limits = [e for e in request.events if e.name == "gateway.limits"]
    assert len(limits) == 1 and limits[0].attributes["marie.operation"] == "chat"
    assert limits[0].attributes["marie.duration_ms"] > 0
    assert "error.type" not in limits[0].attributes

    lookup = _one(spans, "marie-gateway", "gateway.memory_lookup")
    memory_client = _child_of(spans, lookup, "marie-gateway", CLIENT)
    memory_server = _child_of(spans, memory_client, "marie-memory", SERVER)
    assert memory_server.name == "/marie.memory.v1.MemoryService/SearchMemories"
    search = _one(spans, "marie-memory", "memory.search")
    assert ids[search.parent_id] is memory_server

    # The model call: gateway → providers (gRPC) → one CLIENT span, GenAI and
    # HTTP attributes both, whose context the upstream receives.
    providers_server = _one(
        spans, "marie-providers", "/marie.providers.v1.ProviderService/CreateChatCompletion"
    )
    assert ids[providers_server.parent_id].service == "marie-gateway"
    assert ids[providers_server.parent_id].kind == CLIENT
    model_call = _one(spans, "marie-providers", "chat llama3.2:latest")
    assert model_call.kind == CLIENT and ids[model_call.parent_id] is providers_server
    assert model_call.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2:latest",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.5,
        "marie.provider": "ollama",
        "gen_ai.response.id": body["id"],
        "gen_ai.response.model": "llama3.2:latest",
        "gen_ai.usage.input_tokens": body["usage"]["prompt_tokens"],
        "gen_ai.usage.output_tokens": body["usage"]["completion_tokens"],
        "gen_ai.response.finish_reasons": ["stop"],
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": int(ollama.base_url.rsplit(":", 1)[1]),
        "url.path": "/api/chat",
        "http.response.status_code": 200,
    }
    assert [e.name for e in model_call.events] == ["gen_ai.first_token"]
    assert model_call.events[0].attributes["marie.time_to_first_token_ms"] > 0
    assert not [s for s in spans if s.parent_id == model_call.span_id]

    # The upstream received the model call's context.
    sent = next(
        r
        for r in reversed(ollama.chat_requests)
        if r.body["messages"][-1]["content"] == "a secret-ish prompt"
    )
    assert sent.headers["traceparent"] == f"00-{trace_id}-{model_call.span_id}-01"

    # No prompt or completion without MARIE_TRACE_CONTENT, no key ever.
    _assert_no_secret(
        receiver, key, "a secret-ish prompt", body["choices"][0]["message"]["content"]
    )


def test_a_hosted_model_call_is_traced_without_its_key(
    traced: Stack, key: str, receiver: OtlpReceiver, hosted: FakeOpenAI
) -> None:
    trace_id, parent = _traceparent()
    reply = _api(traced, key)(
        "POST",
        "/v1/chat/completions",
        headers={"traceparent": parent},
        json={
            "model": "oai/gpt-fake",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello hosted"}],
        },
    )
    assert reply.status_code == 200, reply.text
    chunks = [
        orjson.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from the hosted fake"
    spans = receiver.wait_for(
        lambda all_spans: any(
            s.trace_id == trace_id and s.name == "chat gpt-fake" for s in all_spans
        )
    )
    model_call = next(s for s in spans if s.trace_id == trace_id and s.name == "chat gpt-fake")
    assert model_call.attributes["gen_ai.provider.name"] == "openai"
    assert model_call.attributes["marie.provider"] == "oai"
    assert model_call.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert model_call.attributes["gen_ai.usage.output_tokens"] > 0
    assert model_call.attributes["url.path"] == "/v1/chat/completions"
    assert model_call.attributes["http.response.status_code"] == 200
    # The upstream saw its key (it answered) and the trace context, the trace never the key.
    _assert_no_secret(receiver, key, UPSTREAM_KEY, f"Bearer {UPSTREAM_KEY}")


def test_log_lines_inside_a_request_carry_its_trace_and_span_ids(
    traced: Stack, key: str, receiver: OtlpReceiver
) -> None:
    trace_id, parent = _traceparent()
    reply = _api(traced, key)(
        "GET", "/v1/models", headers={"traceparent": parent, "x-request-id": "trace-logs-1"}
    )
    assert reply.status_code == 200

    def lines() -> list[dict[str, Any]]:
        out = []
        for line in traced.log().splitlines():
            if "trace-logs-1" in line and line.lstrip().startswith("{"):
                try:
                    out.append(orjson.loads(line[line.index("{") :]))
                except orjson.JSONDecodeError:
                    continue
        return out

    deadline = time.monotonic() + 5
    while not any(e.get("service") == "gateway" for e in lines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = lines()
    assert any(e["service"] == "gateway" and e.get("message") == "http" for e in found), found
    assert any(e["service"] == "providers" and e.get("message") == "rpc" for e in found), found
    # Every line with the request id names the trace, and a span of it.
    assert {e["trace_id"] for e in found} == {trace_id}, found
    logged_spans = {e["span_id"] for e in found}
    receiver.wait_for(
        lambda spans: logged_spans <= {s.span_id for s in spans if s.trace_id == trace_id}
    )


def test_a_turn_and_the_extraction_it_queues_are_linked_traces(
    traced: Stack, key: str, receiver: OtlpReceiver
) -> None:
    api = _api(traced, key)
    created = api("POST", "/api/conversations", json={"title": "Traced", "model": CHAT_MODEL})
    assert created.status_code == 201, created.text
    trace_id, parent = _traceparent()
    turn = api(
        "POST",
        f"/api/conversations/{created.json()['id']}/messages",
        headers={"traceparent": parent},
        json={"content": "I like green tea."},
    )
    assert turn.status_code == 200, turn.text
    assert turn.headers["x-trace-id"] == trace_id

    def queued(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return (
            any(s.name.endswith("/AddMemories") and s.kind == SERVER for s in mine)
            and any(s.service == "marie-gateway" and s.kind == SERVER for s in mine)
            and any(s.name == "chat llama3.2:latest" for s in mine)
        )

    receiver.wait_for(queued)
    add = next(
        s for s in receiver.trace(trace_id) if s.name.endswith("/AddMemories") and s.kind == SERVER
    )
    assert add.service == "marie-memory"
    turn_spans = receiver.trace(trace_id)
    assert {"marie-gateway", "marie-memory", "marie-providers"} <= {s.service for s in turn_spans}
    assert _one(turn_spans, "marie-providers", "chat llama3.2:latest").attributes[
        "gen_ai.response.finish_reasons"
    ] == ["stop"]

    # The job runs later, in a trace of its own, linked to the call that queued it.
    def job_ran(spans: list[Span]) -> bool:
        return any(
            s.name == "memory.extraction_job" and (trace_id, add.span_id) in s.links for s in spans
        )

    spans = receiver.wait_for(job_ran)
    job = next(s for s in spans if s.name == "memory.extraction_job" and s.links)
    assert job.service == "marie-memory" and job.parent_id == ""
    assert job.trace_id != trace_id
    # Its model call is in the job's trace, through providers.
    receiver.wait_for(
        lambda all_spans: any(
            s.trace_id == job.trace_id
            and s.service == "marie-providers"
            and s.name.startswith("chat ")
            for s in all_spans
        )
    )
    _assert_no_secret(receiver, key, "I like green tea.")


@pytest.fixture(scope="module")
def envoy(
    traced: Stack, collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    running = start_envoy(
        tmp_path_factory.mktemp("envoy-traces"),
        {
            "gateway": traced.gateway_port,
            "providers": traced.providers_port,
            "auth": traced.auth_port,
            "memory": traced.memory_port,
            "otel_collector": collector.http_port,
        },
    )
    yield running
    running.stop()


def test_a_grpc_call_through_envoy_is_one_trace_from_envoy_to_the_model(
    envoy: Envoy, key: str, receiver: OtlpReceiver
) -> None:
    with grpc.insecure_channel(envoy.target) as channel:
        stub = pb_grpc.ProviderServiceStub(channel)
        reply = stub.CreateChatCompletion(
            pb.CreateChatCompletionRequest(
                chat=pb.StreamChatCompletionRequest(
                    model=CHAT_MODEL,
                    messages=[pb.ChatMessage(role=pb.ROLE_USER, content="through envoy")],
                )
            ),
            metadata=(("authorization", f"Bearer {key}"), ("x-request-id", "trace-envoy-1")),
            timeout=30,
        )
    completion_id = reply.chunks[0].id

    def model_call(spans: list[Span]) -> Span | None:
        return next(
            (s for s in spans if s.attributes.get("gen_ai.response.id") == completion_id), None
        )

    found = receiver.wait_for(lambda spans: model_call(spans) is not None)
    call = model_call(found)
    assert call is not None
    trace_id = call.trace_id

    # Envoy's spans arrive in its own batches (every 5 s at most).
    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return {"envoy", "marie-gateway", "marie-providers"} <= {s.service for s in mine}

    receiver.wait_for(complete, timeout=20)
    time.sleep(0.3)
    spans = receiver.trace(trace_id)
    ids = _by_id(spans)
    roots = [s for s in spans if s.parent_id not in ids]
    # One trace, started by Envoy.
    assert [(r.service, r.parent_id) for r in roots] == [("envoy", "")], [
        (s.service, s.name, s.parent_id) for s in spans
    ]
    server = _one(
        spans, "marie-providers", "/marie.providers.v1.ProviderService/CreateChatCompletion"
    )
    assert ids[server.parent_id].service == "envoy"
    assert server.attributes["marie.request_id"] == "trace-envoy-1"
    assert ids[call.parent_id] is server
    # Envoy's key check, a call to the gateway, is in the same trace.
    authz = [s for s in spans if s.service == "marie-gateway" and s.kind == SERVER]
    assert len(authz) == 1 and authz[0].attributes["http.route"].startswith("/_authz")
    assert ids[authz[0].parent_id].service == "envoy"
    _assert_no_secret(receiver, key, "through envoy")


def test_a_caller_that_did_not_sample_its_trace_gets_no_span_anywhere(
    traced: Stack, key: str, receiver: OtlpReceiver
) -> None:
    trace_id, parent = _traceparent()
    unsampled = parent[:-2] + "00"
    reply = _api(traced, key)(
        "POST",
        "/v1/chat/completions",
        headers={"traceparent": unsampled},
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "not sampled"}]},
    )
    assert reply.status_code == 200, reply.text
    # x-trace-id names recorded traces only: there is nothing to find under this one.
    assert "x-trace-id" not in reply.headers
    # A later sampled request's spans arrive; none of the unsampled one ever does.
    later, sampled = _traceparent()
    _api(traced, key)("GET", "/v1/models", headers={"traceparent": sampled})
    receiver.wait_for(lambda spans: any(s.trace_id == later for s in spans))
    time.sleep(0.5)
    assert receiver.trace(trace_id) == []
