"""Breakers per deployment and operation, and upstreams saying they cannot do a thing:
embeddings failing never stop chat on the same model, a refusal is the request's
error (never retried, never a breaker failure, its reason passed on), health shows
every operation's circuit and calls a provider with one open `degraded`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator

import grpc
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.config import MarieConfig, ProviderConfig, RoutingConfig
from marie_providers.routing import health as health_module
from marie_providers.settings import ProvidersSettings
from prometheus_client import REGISTRY, generate_latest
from providers_testkit import Service, chat, running_service, stream_outcome

from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.fakes.upstream import Cue
from tests.grpc_testing import rpc_error

SETTINGS = ProvidersSettings(
    port=0,
    ollama_enabled=False,
    connect_timeout_seconds=2,
    read_timeout_seconds=5,
    health_timeout_seconds=1,
)
KEY_ENV = "FAKE_OPERATIONS_KEY"
# What llama.cpp's server answers for embeddings when started without them.
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
# What it answers for an input over its physical batch (an embedding server's ubatch).
TOO_LARGE = (
    "input (513 tokens) is too large to process. increase the physical batch size"
    " (current batch size: 512)"
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def upstream(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    monkeypatch.setenv(KEY_ENV, "test-key")
    server.reset()
    server.models = {"m": FakeChatModel("m", reply="hello there")}
    return server


def config(upstream: FakeOpenAI, routing: RoutingConfig, path: str = "/v1") -> MarieConfig:
    return MarieConfig(
        providers={
            "local": ProviderConfig(
                type="openai", base_url=f"{upstream.base_url}{path}", api_key_env=KEY_ENV
            )
        },
        routing=routing,
    )


@pytest.fixture
async def service(upstream: FakeOpenAI) -> AsyncIterator[Service]:
    routing = RoutingConfig(retries=2, backoff_base_seconds=0.01, breaker_failures=2)
    async with running_service(SETTINGS, config=config(upstream, routing)) as running:
        upstream.reset()
        yield running


def embeddings(model: str = "local/m", *texts: str) -> pb.CreateEmbeddingsRequest:
    return pb.CreateEmbeddingsRequest(model=model, inputs=list(texts) or ["a text"])


async def _drain(call: AsyncIterable[object]) -> None:
    async for _ in call:
        pass


async def deployments(service: Service) -> dict[tuple[str, int], pb.DeploymentHealth]:
    reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="local"))
    return {(d.model, d.operation): d for d in reply.providers[0].deployments}


async def status(service: Service) -> pb.ProviderHealth:
    reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="local"))
    return reply.providers[0]


# ---------------------------------------------------------------------------
# One breaker per operation
# ---------------------------------------------------------------------------


async def test_embeddings_failing_never_open_the_chat_breaker_of_the_same_model(
    service: Service, upstream: FakeOpenAI
) -> None:
    # Two failures in a row (a try and its retry) open the circuit.
    upstream.fail_next(*[Cue.status_error(503)] * 2)
    await rpc_error(service.stub.CreateEmbeddings(embeddings()))
    refused = await rpc_error(service.stub.CreateEmbeddings(embeddings()))
    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
    states = await deployments(service)
    health = await status(service)

    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
    assert error is None
    assert "".join(c.content for c in chunks) == "hello there"
    assert states["local/m", pb.OPERATION_EMBEDDINGS].circuit == pb.CIRCUIT_STATE_OPEN
    assert states["local/m", pb.OPERATION_EMBEDDINGS].HasField("retry_time")
    assert states["local/m", pb.OPERATION_CHAT].circuit == pb.CIRCUIT_STATE_CLOSED
    # It answers its probe, but embeddings are refused: degraded, and said why.
    assert health.status == pb.HEALTH_STATUS_DEGRADED
    assert health.available
    assert "local/m (embeddings) circuit open" in health.error


async def test_chat_failing_never_opens_the_embeddings_breaker(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(*[Cue.status_error(500)] * 2)
    await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    reply = await service.stub.CreateEmbeddings(embeddings())
    states = await deployments(service)

    assert len(reply.embeddings) == 1
    assert states["local/m", pb.OPERATION_CHAT].circuit == pb.CIRCUIT_STATE_OPEN
    assert states["local/m", pb.OPERATION_EMBEDDINGS].circuit == pb.CIRCUIT_STATE_CLOSED


async def test_text_completions_have_a_breaker_of_their_own(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(*[Cue.status_error(500)] * 2)
    await rpc_error(
        _drain(
            service.stub.StreamCompletion(pb.StreamCompletionRequest(model="local/m", prompt="x"))
        )
    )

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
    states = await deployments(service)

    assert error is None and chunks
    assert states["local/m", pb.OPERATION_COMPLETIONS].circuit == pb.CIRCUIT_STATE_OPEN
    assert states["local/m", pb.OPERATION_CHAT].circuit == pb.CIRCUIT_STATE_CLOSED


async def test_an_open_circuit_names_the_provider_model_operation_and_the_wait(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(*[Cue.status_error(503)] * 2)
    await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
    assert error.metadata["provider"] == "local"
    assert error.metadata["model"] == "local/m"
    assert error.metadata["operation"] == "chat"
    # The default open period is 30 s: the wait is what is left of it, in whole seconds.
    assert 28 <= int(error.metadata["retry_after_seconds"]) <= 30
    assert "local/m (chat) failed 2 times in a row" in error.message


async def test_the_breaker_state_of_each_operation_is_a_metric(
    service: Service, upstream: FakeOpenAI
) -> None:
    # Two failures in a row (a try and its retry) open the circuit.
    upstream.fail_next(*[Cue.status_error(503)] * 2)
    await rpc_error(service.stub.CreateEmbeddings(embeddings()))
    await rpc_error(service.stub.CreateEmbeddings(embeddings()))
    await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    exposed = generate_latest(REGISTRY).decode()

    labels = 'model="local/m",operation="{}",provider="local"'
    assert f"marie_providers_circuit_state{{{labels.format('embeddings')}}} 1.0" in exposed
    assert f"marie_providers_circuit_state{{{labels.format('chat')}}} 0.0" in exposed
    assert (
        'marie_providers_refused_total{lane="user",operation="embeddings",'
        'provider="local",reason="CIRCUIT_OPEN"}' in exposed
    )


# ---------------------------------------------------------------------------
# An upstream that cannot do a thing: the request's error, with its reason
# ---------------------------------------------------------------------------


async def test_embeddings_on_a_server_without_them_are_refused_once_with_the_reason(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(*[Cue.status_error(501, message=NO_EMBEDDINGS)] * 4)

    errors = [await rpc_error(service.stub.CreateEmbeddings(embeddings())) for _ in range(4)]
    chunks, chat_error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
    states = await deployments(service)

    for error in errors:
        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_BY_PROVIDER",
        )
        assert "Start it with `--embeddings`" in error.message
        assert error.metadata["provider"] == "local"
    # Never retried, never a breaker failure, never a reason to refuse chat.
    assert len(upstream.requests_to("/v1/embeddings")) == 4
    assert states["local/m", pb.OPERATION_EMBEDDINGS].circuit == pb.CIRCUIT_STATE_CLOSED
    assert states["local/m", pb.OPERATION_EMBEDDINGS].consecutive_failures == 0
    assert chat_error is None and chunks


async def test_an_input_over_the_batch_size_is_the_requests_error_not_the_servers(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(*[Cue.status_error(500, message=TOO_LARGE)] * 3)

    errors = [await rpc_error(service.stub.CreateEmbeddings(embeddings())) for _ in range(3)]
    reply = await service.stub.CreateEmbeddings(embeddings())
    states = await deployments(service)

    for error in errors:
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE")
        assert "input (513 tokens) is too large to process" in error.message
    assert len(upstream.requests_to("/v1/embeddings")) == 4
    assert len(reply.embeddings) == 1
    assert states["local/m", pb.OPERATION_EMBEDDINGS].circuit == pb.CIRCUIT_STATE_CLOSED


async def test_a_prompt_over_the_context_is_too_large_too(
    service: Service, upstream: FakeOpenAI
) -> None:
    message = "the request exceeds the available context size, try increasing it"
    upstream.fail_next(Cue.status_error(400, message=message))

    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LARGE")
    assert message in error.message


async def test_a_route_the_upstream_lacks_is_unsupported_not_a_missing_model(
    upstream: FakeOpenAI,
) -> None:
    # The fake serves /v1 only: under /v2 every route answers a bare 404.
    cfg = config(upstream, RoutingConfig(retries=2, breaker_failures=1), path="/v2")
    async with running_service(SETTINGS, config=cfg) as service:
        upstream.reset()
        _, first = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        _, second = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        states = await deployments(service)

    # One failure would have opened this breaker: the second call would be CIRCUIT_OPEN.
    for error in (first, second):
        assert error is not None
        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNSUPPORTED_BY_PROVIDER",
        )
        assert "HTTP 404" in error.message
    assert states["local/m", pb.OPERATION_CHAT].circuit == pb.CIRCUIT_STATE_CLOSED


async def test_a_model_the_upstream_does_not_know_is_still_model_not_found(
    service: Service, upstream: FakeOpenAI
) -> None:
    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/nope")))

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


# ---------------------------------------------------------------------------
# Recovery: the health probe brings users back before the open period ends
# ---------------------------------------------------------------------------


async def test_a_provider_answering_its_health_probe_is_probed_by_the_next_user(
    upstream: FakeOpenAI,
) -> None:
    routing = RoutingConfig(
        retries=0, breaker_failures=1, breaker_open_seconds=600, health_interval_seconds=0.2
    )
    async with running_service(SETTINGS, config=config(upstream, routing)) as service:
        upstream.fail_next(Cue.status_error(503))
        await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        opened = (await deployments(service))["local/m", pb.OPERATION_CHAT].circuit
        # A health round that finds the provider answering lets the next user
        # probe: the circuit is half-open from then on (waited for, not slept).
        for _ in range(100):
            state = (await deployments(service))["local/m", pb.OPERATION_CHAT].circuit
            if state != pb.CIRCUIT_STATE_OPEN:
                break
            await asyncio.sleep(0.05)
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        closed = (await deployments(service))["local/m", pb.OPERATION_CHAT].circuit

    assert opened == pb.CIRCUIT_STATE_OPEN
    assert error is None and chunks
    assert closed == pb.CIRCUIT_STATE_CLOSED


async def test_a_user_refused_by_an_open_circuit_has_the_provider_probed_at_once(
    upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The start-up round probed just now: let a refusal probe again anyway.
    monkeypatch.setattr(health_module, "SOON_GAP_SECONDS", 0.0)
    # No health round, and a long open period: only the refusal can bring a probe.
    routing = RoutingConfig(
        retries=0, breaker_failures=1, breaker_open_seconds=600, health_interval_seconds=600
    )
    async with running_service(SETTINGS, config=config(upstream, routing)) as service:
        upstream.fail_next(Cue.status_error(503))
        await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        upstream.reset()
        _, refused = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
        probed = await asyncio.to_thread(
            lambda: _wait(lambda: bool(upstream.requests_to("/v1/models")), 5)
        )
        await asyncio.sleep(0.1)  # the probe's answer is read
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))

    assert refused is not None and refused.reason == "CIRCUIT_OPEN"
    assert probed
    assert error is None and chunks


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
