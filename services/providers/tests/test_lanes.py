"""The background lane through the real service: calls marked `x-marie-lane:
background` never take a half-open probe (an open circuit refuses them at once
with the wait), have a concurrency lane of their own, and never make a user's
request wait or fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.lanes import BACKGROUND_METADATA
from marie_providers.config import MarieConfig, ProviderConfig, RoutingConfig
from marie_providers.settings import ProvidersSettings
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
BACKGROUND = (BACKGROUND_METADATA,)
KEY_ENV = "FAKE_LANES_KEY"
# Long enough that a user queued behind background work would visibly wait.
QUEUE_TIMEOUT = 5.0


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
    server.models = {
        "m": FakeChatModel("m", reply="served"),
        "slow": FakeChatModel("slow", endless=True, chunk_delay=0.02),
    }
    return server


def config(
    upstream: FakeOpenAI, routing: RoutingConfig, max_concurrency: int | None = None
) -> MarieConfig:
    entry = ProviderConfig(
        type="openai",
        base_url=f"{upstream.base_url}/v1",
        api_key_env=KEY_ENV,
        max_concurrency=max_concurrency,
    )
    return MarieConfig(providers={"local": entry}, routing=routing)


@pytest.fixture
async def service(upstream: FakeOpenAI) -> AsyncIterator[Service]:
    routing = RoutingConfig(
        retries=0,
        breaker_failures=1,
        breaker_open_seconds=0.3,
        queue_timeout_seconds=QUEUE_TIMEOUT,
        # Long: no health round vouches for the fake during a test.
        health_interval_seconds=600,
    )
    cfg = config(upstream, routing, max_concurrency=1)
    async with running_service(SETTINGS, config=cfg) as running:
        upstream.reset()
        yield running


def text(chunks: list[pb.StreamChatCompletionResponse]) -> str:
    return "".join(c.content for c in chunks)


async def chat_state(service: Service, model: str = "local/m") -> pb.DeploymentHealth:
    reply = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="local"))
    [state] = [
        d
        for d in reply.providers[0].deployments
        if d.model == model and d.operation == pb.OPERATION_CHAT
    ]
    return state


async def open_the_circuit(service: Service, upstream: FakeOpenAI) -> None:
    upstream.fail_next(Cue.status_error(503))
    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
    assert error is not None and error.reason == "UPSTREAM_ERROR"


# ---------------------------------------------------------------------------
# Circuits: users probe, background work waits
# ---------------------------------------------------------------------------


async def test_an_open_circuit_refuses_background_work_at_once_with_the_wait(
    service: Service, upstream: FakeOpenAI
) -> None:
    await open_the_circuit(service, upstream)

    _, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("local/m"), metadata=BACKGROUND)
    )

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
    assert error.metadata["model"] == "local/m"
    assert int(error.metadata["retry_after_seconds"]) >= 1
    assert len(upstream.requests_to("/v1/chat/completions")) == 1


async def test_the_half_open_probe_goes_to_a_user_not_to_background_work(
    service: Service, upstream: FakeOpenAI
) -> None:
    await open_the_circuit(service, upstream)
    await asyncio.sleep(0.35)  # the open period is over: one probe may go
    half_open = await chat_state(service)

    _, background_error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("local/m"), metadata=BACKGROUND)
    )
    chunks, user_error = await stream_outcome(service.stub.StreamChatCompletion(chat("local/m")))
    closed = await chat_state(service)
    after, after_error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("local/m"), metadata=BACKGROUND)
    )

    assert half_open.circuit == pb.CIRCUIT_STATE_HALF_OPEN
    assert background_error is not None and background_error.reason == "CIRCUIT_OPEN"
    assert "so that users' requests probe it first" in background_error.message
    assert user_error is None and text(chunks) == "served"
    assert closed.circuit == pb.CIRCUIT_STATE_CLOSED
    # Once a user's probe closed the circuit, background work goes again.
    assert after_error is None and text(after) == "served"
    # The background call refused in the half-open circuit never reached the upstream.
    assert len(upstream.requests_to("/v1/chat/completions")) == 3


async def test_background_work_probes_itself_when_no_user_comes(
    service: Service, upstream: FakeOpenAI
) -> None:
    await open_the_circuit(service, upstream)
    # The open period, then as long again waiting for a user's probe.
    await asyncio.sleep(0.65)

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("local/m"), metadata=BACKGROUND)
    )

    assert error is None and text(chunks) == "served"
    assert (await chat_state(service)).circuit == pb.CIRCUIT_STATE_CLOSED


async def test_background_embeddings_are_refused_by_an_open_embeddings_circuit(
    service: Service, upstream: FakeOpenAI
) -> None:
    upstream.fail_next(Cue.status_error(503))
    request = pb.CreateEmbeddingsRequest(model="local/m", inputs=["x"])
    await rpc_error(service.stub.CreateEmbeddings(request))

    error = await rpc_error(service.stub.CreateEmbeddings(request, metadata=BACKGROUND))

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
    assert error.metadata["operation"] == "embeddings"


# ---------------------------------------------------------------------------
# Concurrency: a lane of their own
# ---------------------------------------------------------------------------


async def test_a_user_goes_straight_through_while_background_work_is_in_flight(
    service: Service,
) -> None:
    # The deployment serves one user's request at a time (max_concurrency 1).
    background = service.stub.StreamChatCompletion(chat("local/slow"), metadata=BACKGROUND)
    assert isinstance(await background.read(), pb.StreamChatCompletionResponse)
    busy = await chat_state(service, "local/slow")

    user = service.stub.StreamChatCompletion(chat("local/slow"))
    # Queued behind the background call, it would wait QUEUE_TIMEOUT, then fail.
    first = await asyncio.wait_for(user.read(), QUEUE_TIMEOUT / 2)
    both = await chat_state(service, "local/slow")
    user.cancel()
    background.cancel()

    assert (busy.in_flight, busy.background_in_flight) == (0, 1)
    assert isinstance(first, pb.StreamChatCompletionResponse)
    assert (both.in_flight, both.background_in_flight) == (1, 1)
    assert (both.max_concurrency, both.max_background_concurrency) == (1, 1)


async def test_background_work_never_takes_a_users_slot(service: Service) -> None:
    user = service.stub.StreamChatCompletion(chat("local/slow"))
    assert isinstance(await user.read(), pb.StreamChatCompletionResponse)

    # The one user slot is taken; background work has its own lane.
    background = service.stub.StreamChatCompletion(chat("local/slow"), metadata=BACKGROUND)
    first = await asyncio.wait_for(background.read(), QUEUE_TIMEOUT / 2)
    state = await chat_state(service, "local/slow")
    background.cancel()
    user.cancel()

    assert isinstance(first, pb.StreamChatCompletionResponse)
    assert (state.in_flight, state.background_in_flight) == (1, 1)


async def test_background_calls_wait_for_their_lane_as_long_as_their_deadline_allows(
    upstream: FakeOpenAI,
) -> None:
    routing = RoutingConfig(retries=0, queue_timeout_seconds=0.1)
    async with running_service(SETTINGS, config=config(upstream, routing)) as service:
        hog = service.stub.StreamChatCompletion(chat("local/slow"), metadata=BACKGROUND)
        assert isinstance(await hog.read(), pb.StreamChatCompletionResponse)
        queued = service.stub.StreamChatCompletion(
            chat("local/slow"), metadata=BACKGROUND, timeout=10
        )
        first = asyncio.ensure_future(queued.read())
        # Longer than a user's queue timeout: background work waits its turn instead.
        await asyncio.sleep(0.5)
        still_queued = not first.done()
        state = await chat_state(service, "local/slow")
        hog.cancel()
        chunk = await asyncio.wait_for(first, 5)
        queued.cancel()

    assert still_queued
    assert state.background_in_flight == 1
    assert isinstance(chunk, pb.StreamChatCompletionResponse)


async def test_the_background_lane_width_is_a_setting(upstream: FakeOpenAI) -> None:
    routing = RoutingConfig(retries=0, background_concurrency=2)
    async with running_service(SETTINGS, config=config(upstream, routing)) as service:
        calls = [
            service.stub.StreamChatCompletion(chat("local/slow"), metadata=BACKGROUND)
            for _ in range(2)
        ]
        for call in calls:
            assert isinstance(await call.read(), pb.StreamChatCompletionResponse)
        state = await chat_state(service, "local/slow")
        for call in calls:
            call.cancel()

    assert (state.background_in_flight, state.max_background_concurrency) == (2, 2)
