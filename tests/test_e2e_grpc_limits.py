"""gRPC calls through Envoy are held to their key's limits and recorded in the
usage ledger, as the HTTP API's requests are, without counting anything twice.

The suite runs as `marie up` runs it by default (and compose, explicitly):
`MARIE_GATEWAY_LIMITS`, `MARIE_PROVIDERS_LIMITS` and `MARIE_MEMORY_LIMITS`
are `auth` (all hold leases of the key's counters at auth), with real Envoy
on deploy/envoy/envoy.yaml in front (tests/envoy.py). The gateway's key
check adds `x-marie-limits` to the providers' and memory's calls; the
service admits, charges, releases and records them (marie_kit.metering).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.memory.v1 import memory_service_pb2 as memory_pb
from marie.memory.v1 import memory_service_pb2_grpc as memory_grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.tenancy import tenant_user_id

from tests.envoy import Envoy, call_error_info, start_envoy
from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, start_stack

# Every answer of this model costs exactly 10 + 20 tokens.
COUNTED = FakeModel(
    name="grpc-counted:latest", reply="one two", prompt_eval_count=10, eval_count=20
)
MODEL = "ollama/grpc-counted:latest"
ENDLESS = "ollama/endless:latest"
EMBEDDER = "ollama/llama3.2:latest"
LIMITS_HEADER = "x-marie-limits"
RECORD_WAIT_SECONDS = 10.0


@dataclass
class Edge:
    stack: Stack
    envoy: Envoy
    providers: pb_grpc.ProviderServiceStub
    memory: memory_grpc.MemoryServiceStub
    admin: auth_grpc.AuthServiceStub
    data_dir: Path

    def key(self, name: str, **limits: int) -> tuple[str, str]:
        """A new key with these limits: (plaintext, id)."""
        reply = self.admin.CreateApiKey(
            auth_pb.CreateApiKeyRequest(
                name=name,
                scopes=["chat", "embeddings", "models:read", "memory"],
                owner=f"team-{name}",
                limits=auth_pb.KeyLimits(**limits),
            ),
            timeout=10,
        )
        return reply.key, reply.api_key.id

    def chat(self, key: str, model: str = MODEL) -> list[pb.StreamChatCompletionResponse]:
        return list(
            self.providers.StreamChatCompletion(
                pb.StreamChatCompletionRequest(
                    model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
                ),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=30,
            )
        )

    def http_chat(self, key: str, model: str = MODEL) -> httpx.Response:
        return httpx.post(
            f"{self.envoy.url()}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )

    def records(self, key_id: str) -> list[dict[str, Any]]:
        """The key's rows in auth's ledger (its SQLite file), oldest first."""
        db = sqlite3.connect(f"file:{self.data_dir / 'auth.sqlite3'}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM usage_records WHERE key_id = ? ORDER BY time", (key_id,)
            ).fetchall()
        finally:
            db.close()
        return [dict(row) for row in rows]

    def records_when(self, key_id: str, count: int) -> list[dict[str, Any]]:
        """The key's ledger rows once there are `count` (recorders send every second)."""
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while True:
            rows = self.records(key_id)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


@pytest.fixture(scope="module")
def edge(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    ollama.add_model(COUNTED)
    data = tmp_path_factory.mktemp("grpc-limits")
    # marie up's defaults: nothing here says where limits are counted.
    stack = start_stack(data, ollama.base_url)
    envoy: Envoy | None = None
    try:
        envoy = start_envoy(
            tmp_path_factory.mktemp("grpc-limits-envoy"),
            {
                "gateway": stack.gateway_port,
                "providers": stack.providers_port,
                "auth": stack.auth_port,
                "memory": stack.memory_port,
            },
        )
        with (
            grpc.insecure_channel(envoy.target) as edge_channel,
            grpc.insecure_channel(f"127.0.0.1:{stack.auth_port}") as auth_channel,
        ):
            yield Edge(
                stack,
                envoy,
                pb_grpc.ProviderServiceStub(edge_channel),
                memory_grpc.MemoryServiceStub(edge_channel),
                auth_grpc.AuthServiceStub(auth_channel),
                data,
            )
    finally:
        if envoy is not None:
            envoy.stop()
        stack.stop()


def refusal(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a RESOURCE_EXHAUSTED answer."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    return call_error_info(error)


def test_the_key_check_marks_the_providers_and_memory_calls(edge: Edge) -> None:
    key, _ = edge.key("marks", requests_per_minute=7, max_concurrent_requests=2)
    auth = {"authorization": f"Bearer {key}"}
    for method in (
        "ProviderService/StreamChatCompletion",
        "ProviderService/CreateChatCompletion",
        "ProviderService/StreamCompletion",
        "ProviderService/CreateEmbeddings",
        "ProviderService/ListModels",
        "ProviderService/GetModel",
        "MemoryService/ListMemories",
        "MemoryService/AddMemories",
    ):
        service = "providers" if method.startswith("Provider") else "memory"
        answer = httpx.post(
            f"{edge.stack.base_url}/_authz/marie.{service}.v1.{method}", headers=auth
        )
        assert answer.status_code == 200
        assert answer.headers[LIMITS_HEADER] == "rpm=7,tpm=0,tpd=0,concurrent=2"


def test_memory_calls_share_the_keys_requests_per_minute(edge: Edge) -> None:
    """Memory over gRPC, memory over HTTP and a providers lookup draw on one
    key's requests: three holders of leases (memory, the gateway, providers)
    admit the limit within the bound of docs/decisions.md (G·k, G = 3, k = 1
    here), where separate counters would admit three times the limit."""
    rpm = 6
    key, _ = edge.key("grpc-memory", requests_per_minute=rpm)
    auth = (("authorization", f"Bearer {key}"),)
    # The tenant of a key with an owner is its owner.
    mine = memory_pb.ListMemoriesRequest(user_id=tenant_user_id("team-grpc-memory", "alice"))

    def memory_grpc() -> bool:
        try:
            edge.memory.ListMemories(mine, metadata=auth, timeout=10)
        except grpc.RpcError as exc:
            info = refusal(exc)
            assert (info.domain, info.metadata["limit"]) == ("marie.memory", "requests")
            return False
        return True

    def memory_http() -> bool:
        answer = httpx.get(
            f"{edge.envoy.url()}/api/memories?user=alice",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.status_code in (200, 429), answer.text
        return answer.status_code == 200

    def lookup() -> bool:
        try:
            edge.providers.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=10)
        except grpc.RpcError as exc:
            assert refusal(exc).metadata["limit"] == "requests"
            return False
        return True

    kinds = (memory_grpc, memory_http, lookup)
    admitted = {kind.__name__: 0 for kind in kinds}
    refused = 0
    started = time.monotonic()
    for i in range(3 * rpm):
        kind = kinds[i % 3]
        if kind():
            admitted[kind.__name__] += 1
        else:
            refused += 1
    refilled = (time.monotonic() - started) * rpm / 60
    total = sum(admitted.values())
    assert rpm - 3 <= total <= rpm + 3 + refilled, admitted
    assert refused and admitted["memory_grpc"] and admitted["memory_http"], admitted


def test_lookups_count_against_requests_per_minute_but_not_in_the_ledger(edge: Edge) -> None:
    key, key_id = edge.key("grpc-lookups", requests_per_minute=3, tokens_per_minute=20)
    auth = (("authorization", f"Bearer {key}"),)
    listed = edge.providers.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=10)
    assert MODEL in {m.id for m in listed.models}
    # 30 tokens of 20: no more chats, but a lookup spends none.
    assert edge.chat(key)[-1].usage.total_tokens == 30
    with pytest.raises(grpc.RpcError) as caught:
        edge.chat(key)
    assert refusal(caught.value).metadata["limit"] == "tokens"
    edge.providers.GetModel(pb.GetModelRequest(model=MODEL), metadata=auth, timeout=10)
    # Three requests this minute (a refusal takes none): the next lookup waits.
    with pytest.raises(grpc.RpcError) as caught:
        edge.providers.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=10)
    assert refusal(caught.value).metadata["limit"] == "requests"
    # The ledger has the chat alone.
    time.sleep(2.5)  # recorders send every second
    assert [row["operation"] for row in edge.records(key_id)] == ["chat"]


def test_requests_per_minute_admit_exactly_the_limit_then_resource_exhausted(
    edge: Edge,
) -> None:
    rpm = 3
    key, _ = edge.key("grpc-rpm", requests_per_minute=rpm)
    for _ in range(rpm):
        assert "".join(c.content for c in edge.chat(key)) == "one two"
    with pytest.raises(grpc.RpcError) as caught:
        edge.chat(key)
    info = refusal(caught.value)
    assert info.reason == "RATE_LIMITED"
    assert info.domain == "marie.providers"
    assert info.metadata["limit"] == "requests"
    # One request comes back every 20 s at 3 a minute.
    assert 1 <= int(info.metadata["retry_after_seconds"]) <= 20
    retry_after = [m.value for m in caught.value.trailing_metadata() if m.key == "retry-after"]
    assert retry_after == [info.metadata["retry_after_seconds"]]


@pytest.mark.parametrize(
    ("limits", "name"),
    [({"tokens_per_minute": 20}, "tokens"), ({"tokens_per_day": 25}, "tokens_per_day")],
)
def test_token_limits_refuse_after_a_call_that_used_the_tokens(
    edge: Edge, limits: dict[str, int], name: str
) -> None:
    key, _ = edge.key(f"grpc-{name}", **limits)
    chunks = edge.chat(key)
    assert chunks[-1].usage.total_tokens == 30  # over the limit: charged all the same
    with pytest.raises(grpc.RpcError) as caught:
        edge.chat(key)
    assert refusal(caught.value).metadata["limit"] == name


def test_a_concurrency_cap_of_one_holds_a_stream_until_it_is_cancelled(edge: Edge) -> None:
    key, _ = edge.key("grpc-concurrency", max_concurrent_requests=1)
    running = edge.providers.StreamChatCompletion(
        pb.StreamChatCompletionRequest(
            model=ENDLESS, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="go on")]
        ),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=60,
    )
    assert next(running).content  # the stream runs
    with pytest.raises(grpc.RpcError) as caught:
        edge.chat(key)
    assert refusal(caught.value).metadata["limit"] == "concurrency"
    # The slot is the key's, not the protocol's: the HTTP API waits too.
    refused = edge.http_chat(key)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    running.cancel()
    # Cancelling reaches providers through Envoy a moment later.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert "".join(c.content for c in edge.chat(key)) == "one two"
            break
        except grpc.RpcError as exc:
            assert refusal(exc).metadata["limit"] == "concurrency"
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.05)


def test_every_finished_grpc_call_is_in_the_ledger(edge: Edge) -> None:
    key, key_id = edge.key("grpc-ledger")
    edge.chat(key)
    embedded = edge.providers.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(model=EMBEDDER, inputs=["one two three"]),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=30,
    )
    assert embedded.usage.prompt_tokens == 3
    with pytest.raises(grpc.RpcError) as caught:
        edge.chat(key, "ollama/no-such-model:latest")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    rows = edge.records_when(key_id, 3)
    assert len(rows) == 3, rows
    chat, embeddings, missing = rows
    assert {k: chat[k] for k in ("owner", "provider", "model", "operation", "status")} == {
        "owner": "team-grpc-ledger",
        "provider": "ollama",
        "model": MODEL,
        "operation": "chat",
        "status": 200,
    }
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (10, 20)
    assert chat["latency_ms"] > 0
    assert (embeddings["operation"], embeddings["model"]) == ("embeddings", EMBEDDER)
    assert (embeddings["prompt_tokens"], embeddings["status"]) == (3, 200)
    assert (missing["model"], missing["status"]) == ("ollama/no-such-model:latest", 404)
    # The HTTP API's report counts them like its own requests.
    report = httpx.get(
        f"{edge.envoy.url()}/api/usage",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    ).json()
    assert report["total"]["requests"] == 3
    assert report["total"]["errors"] == 1
    assert report["total"]["total_tokens"] == 33


def test_a_whole_chat_over_grpc_is_limited_and_recorded(edge: Edge) -> None:
    """CreateChatCompletion (the unary whole-reply call) is metered like the stream."""
    key, key_id = edge.key("grpc-whole", requests_per_minute=1)
    whole = pb.CreateChatCompletionRequest(
        chat=pb.StreamChatCompletionRequest(
            model=MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]
        )
    )
    auth = (("authorization", f"Bearer {key}"),)
    reply = edge.providers.CreateChatCompletion(whole, metadata=auth, timeout=30)
    assert "".join(c.content for c in reply.chunks) == "one two"
    with pytest.raises(grpc.RpcError) as caught:
        edge.providers.CreateChatCompletion(whole, metadata=auth, timeout=30)
    assert refusal(caught.value).reason == "RATE_LIMITED"
    (row,) = edge.records_when(key_id, 1)
    assert (row["operation"], row["provider"], row["model"], row["status"]) == (
        "chat",
        "ollama",
        MODEL,
        200,
    )
    assert (row["prompt_tokens"], row["completion_tokens"]) == (10, 20)


def test_an_http_request_is_recorded_once_not_again_by_providers(edge: Edge) -> None:
    key, key_id = edge.key("http-once")
    answer = edge.http_chat(key)
    assert answer.status_code == 200, answer.text
    rows = edge.records_when(key_id, 1)
    # Both recorders send every second: a second record would be there by now.
    time.sleep(2.5)
    rows = edge.records(key_id)
    assert len(rows) == 1, rows
    assert (rows[0]["operation"], rows[0]["prompt_tokens"], rows[0]["status"]) == ("chat", 10, 200)


def test_http_and_grpc_draw_on_the_same_requests_per_minute(edge: Edge) -> None:
    """Two holders of leases (the gateway for HTTP, providers for gRPC): together
    they admit the limit within the bound of docs/decisions.md (G·k, G = 2,
    k = 1 here), where separate counters would admit twice the limit."""
    rpm = 6
    key, _ = edge.key("mixed-rpm", requests_per_minute=rpm)
    http_ok = grpc_ok = http_refused = grpc_refused = 0
    started = time.monotonic()
    for i in range(2 * rpm):
        if i % 2:
            if edge.http_chat(key).status_code == 200:
                http_ok += 1
            else:
                http_refused += 1
        else:
            try:
                edge.chat(key)
                grpc_ok += 1
            except grpc.RpcError as exc:
                assert refusal(exc).metadata["limit"] == "requests"
                grpc_refused += 1
    refilled = (time.monotonic() - started) * rpm / 60
    assert rpm - 2 <= http_ok + grpc_ok <= rpm + 2 + refilled
    assert http_ok and grpc_ok and http_refused and grpc_refused


def test_grpc_clients_through_envoy_share_the_response_cache_per_owner(edge: Edge) -> None:
    key, key_id = edge.key("grpc-cache")
    other, _ = edge.key("grpc-cache-other")
    asked = pb.StreamChatCompletionRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content="cache me over grpc")],
        cache=pb.CachePolicy(mode=pb.CACHE_MODE_USE),
    )

    def chat(plaintext: str) -> list[pb.StreamChatCompletionResponse]:
        chunks = list(
            edge.providers.StreamChatCompletion(
                asked, metadata=(("authorization", f"Bearer {plaintext}"),), timeout=30
            )
        )
        time.sleep(0.3)  # the answer is stored just after it is sent
        return chunks

    first, second, theirs = chat(key), chat(key), chat(other)

    assert (first[0].cache, second[0].cache, theirs[0].cache) == (
        pb.CACHE_RESULT_MISS,
        pb.CACHE_RESULT_HIT,
        pb.CACHE_RESULT_MISS,
    )
    assert "".join(c.content for c in second) == "".join(c.content for c in first)
    rows = edge.records_when(key_id, 2)
    assert [(r["cached"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (0, 10, 20),
        (1, 0, 0),
    ]
