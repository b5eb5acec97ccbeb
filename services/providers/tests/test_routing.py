"""Routing through the real service: aliases fail over before the first token and never
after it, retries wait as long as the upstream asks (within the deadline),
breakers open and close, concurrency limits fail over, splits stick per user."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.acceptance import accepted_cache_result
from marie_providers.config import MarieConfig, ProviderConfig, RoutingConfig
from marie_providers.routing.router import pick_arm, sticky_fraction
from marie_providers.settings import ProvidersSettings
from providers_testkit import Service, chat, closed_port_url, running_service, stream_outcome

from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_server import FakeChatModel, FakeOpenAI
from tests.fakes.upstream import Cue
from tests.grpc_testing import rpc_error

KEY_ENV = "FAKE_ROUTING_KEY"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI() as first, FakeOpenAI() as second:
        yield first, second  # type: ignore[misc]


@pytest.fixture
def upstreams(
    servers: tuple[FakeOpenAI, FakeOpenAI], monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeOpenAI, FakeOpenAI]:
    monkeypatch.setenv(KEY_ENV, "test-key")
    for name, server in zip(("primary", "backup"), servers, strict=True):
        server.reset()
        server.models = {
            "m": FakeChatModel("m", reply=f"answer from {name}"),
            "slow": FakeChatModel("slow", endless=True, chunk_delay=0.02),
        }
    return servers


def config(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
    routing: RoutingConfig,
    *,
    max_concurrency: int | None = None,
    splits: dict[str, dict[str, int]] | None = None,
) -> MarieConfig:
    a, b = upstreams
    return MarieConfig(
        providers={
            "a": ProviderConfig(
                type="openai",
                base_url=f"{a.base_url}/v1",
                api_key_env=KEY_ENV,
                max_concurrency=max_concurrency,
            ),
            "b": ProviderConfig(type="openai", base_url=f"{b.base_url}/v1", api_key_env=KEY_ENV),
        },
        aliases={"fast": ("a/m", "b/m"), "slowpoke": ("a/slow", "b/m")},
        splits=splits or {"ab": {"a/m": 90, "b/m": 10}},
        routing=routing,
    )


SETTINGS = ProvidersSettings(
    port=0,
    ollama_enabled=False,
    connect_timeout_seconds=2,
    read_timeout_seconds=5,
    health_timeout_seconds=1,
)


@pytest.fixture
async def service(upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> AsyncIterator[Service]:
    routing = RoutingConfig(retries=0, first_token_timeout_seconds=1, breaker_failures=50)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as running:
        for server in upstreams:
            server.reset()
        yield running


def text(chunks: list[pb.StreamChatCompletionResponse]) -> str:
    return "".join(c.content for c in chunks)


# ---------------------------------------------------------------------------
# Aliases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cue",
    [
        Cue.status_error(500),
        Cue.status_error(503),
        Cue.status_error(429),
        Cue.hang(),
        Cue.slow_first(3),
        # Accepted (the caller is told), then silent: the backup's acceptance
        # is not told again.
        Cue.slow_first_chunk(3),
    ],
    ids=["500", "503", "429", "hang", "slow-first-token", "accepted-then-slow"],
)
async def test_an_alias_fails_over_before_the_first_token(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI], cue: Cue
) -> None:
    primary, backup = upstreams
    primary.fail_next(cue)

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert error is None
    assert text(chunks) == "answer from backup"
    assert {c.model for c in chunks} == {"b/m"}
    assert len(primary.requests_to("/v1/chat/completions")) == 1
    assert len(backup.requests_to("/v1/chat/completions")) == 1


@pytest.mark.parametrize(
    ("cue", "accepted"),
    [(Cue.slow_first_chunk(2), True), (Cue.status_error(400, message="bad"), False)],
    ids=["accepted", "refused"],
)
async def test_a_stream_says_in_its_head_when_its_upstream_accepted_it(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI], cue: Cue, accepted: bool
) -> None:
    # The upstream sends its status and headers, then works on the first
    # token: the caller can start its own answer meanwhile. A refusal is the
    # call's status, with nothing said before it.
    primary, _ = upstreams
    primary.fail_next(cue)

    call = service.stub.StreamChatCompletion(chat("a/m"))
    head = await call.initial_metadata()
    chunks, error = await stream_outcome(call)

    if accepted:
        assert accepted_cache_result(head) == pb.CACHE_RESULT_UNSPECIFIED
        assert (error, text(chunks)) == (None, "answer from primary")
    else:
        assert accepted_cache_result(head) is None
        assert error is not None
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_alias_fails_over_when_the_first_deployment_refuses_connections(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    cfg = config(upstreams, RoutingConfig(retries=0))
    dead = ProviderConfig(type="openai", base_url=f"{closed_port_url()}/v1")
    cfg = cfg.model_copy(update={"providers": {**cfg.providers, "a": dead}})
    async with running_service(SETTINGS, config=cfg) as service:
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert error is None
    assert text(chunks) == "answer from backup"


async def test_the_last_deployment_gets_all_the_time_it_needs_for_a_first_token(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, _ = upstreams
    # Longer than the 1 s first-token timeout: a model loading, say.
    primary.fail_next(Cue.slow_first(1.5))

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))

    assert error is None
    assert text(chunks) == "answer from primary"
    assert len(primary.requests_to("/v1/chat/completions")) == 1


async def test_no_failover_once_output_has_started(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, backup = upstreams
    primary.fail_next(Cue.die_after(2))

    chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert text(chunks) == "answer from"
    assert error is not None
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert backup.requests_to("/v1/chat/completions") == []


async def test_an_alias_whose_deployments_all_fail_says_what_it_tried(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, backup = upstreams
    primary.fail_next(Cue.status_error(500))
    backup.fail_next(Cue.status_error(429, retry_after="5"))

    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert error is not None
    assert (error.code, error.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPSTREAM_RATE_LIMITED",
    )
    assert "tried a/m, b/m" in error.message
    assert error.metadata["retry_after_seconds"] == "5"


async def test_a_request_error_does_not_fail_over(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, backup = upstreams
    primary.fail_next(Cue.status_error(400, message="bad tool schema", param="tools"))

    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert error is not None
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert backup.requests_to("/v1/chat/completions") == []


async def test_embeddings_fail_over_too(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, backup = upstreams
    primary.fail_next(Cue.status_error(502))

    reply = await service.stub.CreateEmbeddings(
        pb.CreateEmbeddingsRequest(model="fast", inputs=["x"])
    )

    assert reply.model == "b/m"
    assert len(backup.requests_to("/v1/embeddings")) == 1


async def test_aliases_and_splits_are_listed_with_their_targets(service: Service) -> None:
    reply = await service.stub.ListModels(pb.ListModelsRequest())
    alias = await service.stub.GetModel(pb.GetModelRequest(model="fast"))

    routes = {m.id: m for m in reply.models if m.HasField("route")}
    assert set(routes) == {"ab", "fast", "slowpoke"}
    assert routes["fast"].route.kind == pb.ROUTE_KIND_ALIAS
    assert [t.model for t in routes["fast"].route.targets] == ["a/m", "b/m"]
    assert routes["fast"].description == "Alias: tries a/m, then b/m"
    assert routes["ab"].route.kind == pb.ROUTE_KIND_SPLIT
    assert [(t.model, t.weight) for t in routes["ab"].route.targets] == [("a/m", 90), ("b/m", 10)]
    assert alias.model == routes["fast"]
    # The listing still has every provider's own models.
    assert {"a/m", "b/m"} <= {m.id for m in reply.models}


# ---------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------


async def test_a_retry_waits_as_long_as_retry_after_asks(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    primary, _backup = upstreams
    routing = RoutingConfig(retries=2, backoff_base_seconds=0.01, backoff_max_seconds=5)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as service:
        primary.reset()
        primary.fail_next(Cue.status_error(429, retry_after="1"))
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))

    assert error is None
    assert text(chunks) == "answer from primary"
    first, second = primary.requests_to("/v1/chat/completions")
    assert 1.0 <= second.at - first.at < 2.0


async def test_retries_back_off_then_fall_back(upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    primary, _backup = upstreams
    routing = RoutingConfig(retries=2, backoff_base_seconds=0.2, backoff_max_seconds=5)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as service:
        primary.reset()
        primary.fail_next(*[Cue.status_error(500)] * 3)
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))

    assert error is None
    assert text(chunks) == "answer from backup"
    attempts = primary.requests_to("/v1/chat/completions")
    assert len(attempts) == 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    # Equal jitter: between half and all of 0.2 s, then of 0.4 s.
    assert 0.1 <= gaps[0] < 0.35
    assert 0.2 <= gaps[1] < 0.55


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    primary, _ = upstreams
    routing = RoutingConfig(retries=3, backoff_max_seconds=60)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as service:
        primary.reset()
        primary.fail_next(Cue.status_error(429, retry_after="30"))
        started = time.monotonic()
        _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m"), timeout=2))

    assert error is not None
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.metadata["retry_after_seconds"] == "30"
    assert time.monotonic() - started < 1
    assert len(primary.requests_to("/v1/chat/completions")) == 1


# ---------------------------------------------------------------------------
# Circuit breaker
# ---------------------------------------------------------------------------


async def test_the_breaker_opens_skips_the_deployment_and_closes_after_a_good_probe(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    primary, _backup = upstreams
    routing = RoutingConfig(retries=0, breaker_failures=2, breaker_open_seconds=0.5)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as service:
        primary.reset()
        primary.fail_next(Cue.status_error(500), Cue.status_error(500))
        for _ in range(2):
            await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))
        opened = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="a"))

        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))
        direct = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))
        calls_while_open = len(primary.requests_to("/v1/chat/completions"))

        await asyncio.sleep(0.6)
        half_open = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="a"))
        probe, probe_error = await stream_outcome(service.stub.StreamChatCompletion(chat("fast")))
        closed = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="a"))

    [state] = [d for d in opened.providers[0].deployments if d.model == "a/m"]
    assert state.circuit == pb.CIRCUIT_STATE_OPEN
    assert state.consecutive_failures == 2
    assert state.HasField("retry_time")
    # While open, the alias goes straight to the backup, and the model itself fails fast.
    assert error is None and text(chunks) == "answer from backup"
    assert direct[1] is not None and direct[1].reason == "CIRCUIT_OPEN"
    assert calls_while_open == 2
    [state] = [d for d in half_open.providers[0].deployments if d.model == "a/m"]
    assert state.circuit == pb.CIRCUIT_STATE_HALF_OPEN
    assert probe_error is None and text(probe) == "answer from primary"
    [state] = [d for d in closed.providers[0].deployments if d.model == "a/m"]
    assert state.circuit == pb.CIRCUIT_STATE_CLOSED
    assert state.consecutive_failures == 0


async def test_a_failed_probe_opens_the_breaker_again(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    primary, _ = upstreams
    routing = RoutingConfig(retries=0, breaker_failures=1, breaker_open_seconds=0.3)
    async with running_service(SETTINGS, config=config(upstreams, routing)) as service:
        primary.reset()
        primary.fail_next(Cue.status_error(500), Cue.status_error(500))
        await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))
        await asyncio.sleep(0.4)
        _, probe_error = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))
        _, skipped = await stream_outcome(service.stub.StreamChatCompletion(chat("a/m")))

    assert probe_error is not None and probe_error.reason == "UPSTREAM_ERROR"
    assert skipped is not None and skipped.reason == "CIRCUIT_OPEN"
    assert len(primary.requests_to("/v1/chat/completions")) == 2


# ---------------------------------------------------------------------------
# Concurrency limit
# ---------------------------------------------------------------------------


async def test_over_the_concurrency_limit_an_alias_fails_over_and_a_model_is_busy(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    _primary, _backup = upstreams
    routing = RoutingConfig(retries=0, queue_timeout_seconds=0.2)
    cfg = config(upstreams, routing, max_concurrency=1)
    async with running_service(SETTINGS, config=cfg) as service:
        hog = service.stub.StreamChatCompletion(chat("a/slow"))
        await hog.read()  # a/slow's provider now has its one request in flight … on a/slow
        other = service.stub.StreamChatCompletion(chat("a/slow"))
        _, busy = await stream_outcome(other)
        health = await service.stub.GetProviderHealth(pb.GetProviderHealthRequest(provider="a"))
        hog.cancel()

    assert busy is not None
    assert (busy.code, busy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DEPLOYMENT_BUSY")
    [state] = [d for d in health.providers[0].deployments if d.model == "a/slow"]
    assert (state.in_flight, state.max_concurrency) == (1, 1)


async def test_an_alias_over_the_limit_uses_its_next_deployment(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    _primary, _backup = upstreams
    routing = RoutingConfig(retries=0, queue_timeout_seconds=0.2)
    cfg = config(upstreams, routing, max_concurrency=1)
    async with running_service(SETTINGS, config=cfg) as service:
        hog = service.stub.StreamChatCompletion(chat("slowpoke"))
        first = await hog.read()
        chunks, error = await stream_outcome(service.stub.StreamChatCompletion(chat("slowpoke")))
        hog.cancel()

    assert isinstance(first, pb.StreamChatCompletionResponse) and first.model == "a/slow"
    assert error is None
    assert text(chunks) == "answer from backup"


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def test_split_arms_follow_the_weights() -> None:
    counts = Counter(pick_arm([90, 10], sticky_fraction("ab", f"user-{i}")) for i in range(4000))

    assert 0.87 < counts[0] / 4000 < 0.93


def test_the_same_user_always_gets_the_same_arm() -> None:
    arms = {pick_arm([50, 50], sticky_fraction("ab", "alice")) for _ in range(50)}

    assert len(arms) == 1


async def test_a_split_sends_each_user_to_one_arm_through_the_service(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    routing = RoutingConfig(retries=0)
    cfg = config(upstreams, routing, splits={"ab": {"a/m": 50, "b/m": 50}})
    async with running_service(SETTINGS, config=cfg) as service:
        served: dict[str, set[str]] = {}
        for index in range(12):
            name = f"user-{index}"
            for _ in range(3):
                chunks, error = await stream_outcome(
                    service.stub.StreamChatCompletion(chat("ab", user=name))
                )
                assert error is None
                served.setdefault(name, set()).add(chunks[0].model)

    assert all(len(models) == 1 for models in served.values())
    # With 12 users at 50/50, both arms serve someone.
    assert set().union(*served.values()) == {"a/m", "b/m"}


async def test_an_unknown_routed_name_is_model_not_found(service: Service) -> None:
    _, error = await stream_outcome(service.stub.StreamChatCompletion(chat("nope-alias")))
    missing = await rpc_error(service.stub.GetModel(pb.GetModelRequest(model="nope-alias")))

    assert error is not None and error.code == grpc.StatusCode.NOT_FOUND
    assert missing.code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------
# Model restrictions of keys
# ---------------------------------------------------------------------------


def allowed(*patterns: str) -> tuple[tuple[str, str], ...]:
    return (("x-marie-allowed-models", ",".join(patterns)),)


async def test_a_restricted_key_is_routed_only_to_deployments_it_may_use(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, _ = upstreams

    chunks, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("fast"), metadata=allowed("b/*"))
    )

    assert error is None
    assert text(chunks) == "answer from backup"
    # The prompt never reached the deployment the key may not use.
    assert primary.requests_to("/v1/chat/completions") == []


async def test_a_routed_name_with_no_allowed_target_is_not_allowed(
    service: Service, upstreams: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    _, error = await stream_outcome(
        service.stub.StreamChatCompletion(chat("fast"), metadata=allowed("other/*"))
    )
    missing = await rpc_error(
        service.stub.GetModel(pb.GetModelRequest(model="fast"), metadata=allowed("other/*"))
    )

    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert all(s.requests == [] for s in upstreams)


async def test_a_restricted_key_sees_only_the_routes_and_targets_it_may_use(
    service: Service,
) -> None:
    reply = await service.stub.ListModels(pb.ListModelsRequest(), metadata=allowed("b/m"))

    routes = {m.id: [t.model for t in m.route.targets] for m in reply.models if m.HasField("route")}
    assert routes == {"ab": ["b/m"], "fast": ["b/m"], "slowpoke": ["b/m"]}
    assert [m.id for m in reply.models if not m.HasField("route")] == ["b/m"]


async def test_spellings_of_one_ollama_model_share_one_breaker(fake: FakeOllama) -> None:
    fake.set_model("llama3.2:latest", status_error=(500, "GPU fell over"))
    cfg = MarieConfig(
        providers={"ollama": ProviderConfig(type="ollama", base_url=fake.base_url)},
        routing=RoutingConfig(retries=0, breaker_failures=1),
    )
    async with running_service(SETTINGS, config=cfg) as service:
        _, first = await stream_outcome(service.stub.StreamChatCompletion(chat("ollama/llama3.2")))
        _, second = await stream_outcome(
            service.stub.StreamChatCompletion(chat("ollama/llama3.2:latest"))
        )

    assert first is not None and first.reason == "UPSTREAM_ERROR"
    assert second is not None and second.reason == "CIRCUIT_OPEN"


async def test_a_key_allowed_fewer_targets_of_an_alias_never_gets_the_others_cached_answer(
    upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Path
) -> None:
    # One owner, two keys: the first may use both targets and is answered
    # by a/m; the second may use b/m only, so a/m's answer is not its to see.
    routing = RoutingConfig(retries=0, first_token_timeout_seconds=1, breaker_failures=50)
    # (model_copy runs no validator: the cache path is given, not derived.)
    settings = SETTINGS.model_copy(update={"cache_path": tmp_path / "cache.sqlite3"})
    cached = pb.CachePolicy(mode=pb.CACHE_MODE_USE)
    owner = (("x-marie-key-id", "key-1"), ("x-marie-owner", "team-a"))
    narrow = (
        ("x-marie-key-id", "key-2"),
        ("x-marie-owner", "team-a"),
        ("x-marie-allowed-models", "b/m"),
    )
    async with running_service(settings, config=config(upstreams, routing)) as service:
        wide, _ = await stream_outcome(
            service.stub.StreamChatCompletion(chat("fast", cache=cached), metadata=owner)
        )
        await asyncio.sleep(0.2)
        again, _ = await stream_outcome(
            service.stub.StreamChatCompletion(chat("fast", cache=cached), metadata=owner)
        )
        only_b, _ = await stream_outcome(
            service.stub.StreamChatCompletion(chat("fast", cache=cached), metadata=narrow)
        )
    assert (text(wide), again[0].cache) == ("answer from primary", pb.CACHE_RESULT_HIT)
    assert (text(only_b), only_b[0].cache) == ("answer from backup", pb.CACHE_RESULT_MISS)
