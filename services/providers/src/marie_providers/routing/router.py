"""Routing: a requested model (a model id, an alias or a split) becomes an ordered list of
deployments, tried with retries, circuit breakers and concurrency limits.

`Router.plan` is the one step that resolves what a request names into the
deployments that may serve it, before any upstream call; checks on what a
caller may use belong right after it. Failing over happens only before the
first chunk: once output has started, an error reaches the caller as is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit import tracing
from marie_kit.errors import ServiceError

from marie_providers.config import RoutingConfig
from marie_providers.errors import DOMAIN, RETRY_AFTER_KEY, model_not_found, retry_after_of
from marie_providers.routing.metrics import refused, watch_circuits
from marie_providers.routing.model_access import UNRESTRICTED, ModelAccess, model_not_allowed
from marie_providers.routing.registry import ModelRegistry
from marie_providers.routing.resilience import Circuit, CircuitBreaker, ConcurrencyLimit
from marie_providers.upstream.provider import Provider
from marie_providers.upstream.stops import matching_stops, without_stops
from marie_providers.upstream.transport import Accepted

log = logging.getLogger("marie.providers.routing")

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Codes that say "this deployment is failing now", not "this request is wrong":
# they count against the breaker and move on to the next deployment.
DEPLOYMENT_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# Failures a second try on the same deployment can't fix.
# A first-token timeout is not retried either: trying the same deployment again
# would abort what it was busy with (an Ollama model loading) and start over.
NOT_RETRIED_REASONS = frozenset(
    {"UPSTREAM_AUTH_FAILED", "CIRCUIT_OPEN", "DEPLOYMENT_BUSY", "FIRST_TOKEN_TIMEOUT"}
)
# Reasons of a call refused before any upstream was asked.
REFUSALS = frozenset({"CIRCUIT_OPEN", "DEPLOYMENT_BUSY"})

CIRCUIT_STATES: Mapping[Circuit, pb.CircuitState] = {
    Circuit.CLOSED: pb.CIRCUIT_STATE_CLOSED,
    Circuit.OPEN: pb.CIRCUIT_STATE_OPEN,
    Circuit.HALF_OPEN: pb.CIRCUIT_STATE_HALF_OPEN,
}


class Operation(Enum):
    """What a request asks of a deployment; each has a circuit breaker of its own."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


OPERATIONS: Mapping[Operation, pb.Operation] = {
    Operation.CHAT: pb.OPERATION_CHAT,
    Operation.COMPLETIONS: pb.OPERATION_COMPLETIONS,
    Operation.EMBEDDINGS: pb.OPERATION_EMBEDDINGS,
}


@dataclass(eq=False)
class Deployment:
    """One model of one provider, with the state that protects it: a circuit
    breaker per operation, a concurrency limit for users' requests and a lane
    of its own for background calls."""

    provider: Provider
    model: str
    new_breaker: Callable[[], CircuitBreaker]
    limit: ConcurrencyLimit
    background: ConcurrencyLimit
    breakers: dict[Operation, CircuitBreaker] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.provider.model_id(self.model)

    def breaker(self, operation: Operation) -> CircuitBreaker:
        """The breaker of `operation` (made at its first use)."""
        found = self.breakers.get(operation)
        if found is None:
            found = self.breakers[operation] = self.new_breaker()
        return found

    def lane(self, background: bool) -> ConcurrencyLimit:
        return self.background if background else self.limit

    def health(self, wall_offset: float) -> list[pb.DeploymentHealth]:
        """The state of each operation asked of this deployment; `wall_offset` turns
        clock times into Unix times."""
        out = []
        for operation, breaker in sorted(self.breakers.items(), key=lambda o: o[0].value):
            state = breaker.state
            health = pb.DeploymentHealth(
                model=self.id,
                operation=OPERATIONS[operation],
                circuit=CIRCUIT_STATES[state],
                consecutive_failures=breaker.failures,
                in_flight=self.limit.in_flight,
                max_concurrency=self.limit.limit,
                background_in_flight=self.background.in_flight,
                max_background_concurrency=self.background.limit,
            )
            retry_at = breaker.retry_at
            if state is Circuit.OPEN and retry_at is not None:
                stamp = timestamp_pb2.Timestamp()
                stamp.FromNanoseconds(int((retry_at + wall_offset) * 1e9))
                health.retry_time.CopyFrom(stamp)
            out.append(health)
        return out


@dataclass(frozen=True)
class RoutePlan:
    """What a request named, and the deployments to try for it, in order."""

    requested: str
    kind: pb.RouteKind
    deployments: tuple[Deployment, ...]


@dataclass(frozen=True)
class _Route:
    kind: pb.RouteKind
    # (provider, model name, weight) in configuration order; weight 0 for aliases.
    targets: tuple[tuple[str, str, int], ...]


def sticky_fraction(name: str, user: str) -> float:
    """A number in [0, 1) fixed for (split, user): the same user always lands in the same arm."""
    digest = hashlib.sha256(f"{name}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_arm(weights: list[int], fraction: float) -> int:
    """The index whose share of the weights `fraction` falls in."""
    point = fraction * sum(weights)
    for index, weight in enumerate(weights):
        if point < weight:
            return index
        point -= weight
    return len(weights) - 1


class Router:
    """Resolves requested models to deployments and calls them resiliently."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        aliases: Mapping[str, tuple[str, ...]] | None = None,
        splits: Mapping[str, Mapping[str, int]] | None = None,
        routing: RoutingConfig | None = None,
        max_concurrency: Mapping[str, int] | None = None,
        background_concurrency: Mapping[str, int] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.policy = routing or RoutingConfig()
        self._limits = dict(max_concurrency or {})
        self._background_limits = dict(background_concurrency or {})
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter and arm choice, not secrets
        self._deployments: dict[tuple[str, str], Deployment] = {}
        self._routes: dict[str, _Route] = {}
        for name, targets in (aliases or {}).items():
            self._routes[name] = _Route(
                pb.ROUTE_KIND_ALIAS, tuple((*_split_id(t), 0) for t in targets)
            )
        for name, arms in (splits or {}).items():
            self._routes[name] = _Route(
                pb.ROUTE_KIND_SPLIT, tuple((*_split_id(t), w) for t, w in arms.items())
            )
        self._watch = watch_circuits(self.circuit_states)
        #: Told the provider's name when a user's request is refused by an open
        #: circuit: the health monitor then probes it soon, so a server back
        #: from an outage serves the users who wait for it within seconds.
        self.on_refused: Callable[[str], None] | None = None
        # Deployments that routes lead to are known (and shown in health) from the start.
        for route in self._routes.values():
            for provider, model, _ in route.targets:
                self.deployment(registry.provider(provider), model).breaker(Operation.CHAT)

    # -- resolution ----------------------------------------------------------

    def deployment(self, provider: Provider, model: str) -> Deployment:
        """The (one, shared) deployment of `model` on `provider`: spellings the
        provider takes for the same model ("llama3.2", "llama3.2:latest") share it."""
        key = (provider.name, provider.canonical_model_name(model))
        found = self._deployments.get(key)
        if found is None:
            limit = self._limits.get(provider.name, self.policy.max_concurrency)
            background = self._background_limits.get(
                provider.name, self.policy.background_concurrency
            )
            policy, clock = self.policy, self._clock
            found = Deployment(
                provider,
                model,
                lambda: CircuitBreaker(policy.breaker_failures, policy.breaker_open_seconds, clock),
                ConcurrencyLimit(limit),
                ConcurrencyLimit(background),
            )
            self._deployments[key] = found
        return found

    def now(self) -> float:
        """The time on the clock breakers keep."""
        return self._clock()

    def vouch(self, provider: str, since: float) -> None:
        """`provider` answered a health probe sent at `since` (see `now`): its circuits
        opened before then are due for a probe now, so a server back from an outage
        serves users within one health interval, not a whole open period later."""
        for (owner, _), deployment in self._deployments.items():
            if owner == provider:
                for breaker in deployment.breakers.values():
                    breaker.vouch(since)

    def is_route(self, name: str) -> bool:
        return name in self._routes

    def _allowed_targets(self, route: _Route, access: ModelAccess) -> list[tuple[str, str, int]]:
        """The route's targets the caller may use, in configuration order."""
        if not access.restricted:
            return list(route.targets)
        canonical = self.registry.canonical
        return [
            (p, name, weight)
            for p, name, weight in route.targets
            if access.allows(p, canonical(p, name) or name, canonical)
        ]

    async def plan(
        self,
        model: str,
        provider: str = "",
        user: str = "",
        access: ModelAccess = UNRESTRICTED,
    ) -> RoutePlan:
        """The deployments that may serve `model`, in the order to try them.

        An alias gives its targets in order; a split its weighted pick for
        `user` first, then its other arms by weight. Anything else is one
        model resolved by the registry (no upstream call for "<provider>/<model>").

        A key's model restrictions (`access`) hold for every deployment: a
        routed name keeps only the targets the key may use (a prompt never
        reaches an upstream the key may not use), and is MODEL_NOT_ALLOWED when
        none is left. Keys name models, never routed names, so the targets are
        what is checked.
        """
        route = None if provider else self._routes.get(model)
        if route is None:
            owner, name = await self.registry.resolve(model, provider, access)
            if owner.allowed_models is not None:
                # The configuration's allow-list, compared in the provider's own spelling.
                allowed = {owner.canonical_model_name(m) for m in owner.allowed_models}
                if owner.canonical_model_name(name) not in allowed:
                    raise model_not_found(name, owner.name)
            return RoutePlan(model, pb.ROUTE_KIND_UNSPECIFIED, (self.deployment(owner, name),))
        targets = self._allowed_targets(route, access)
        if not targets:
            raise model_not_allowed(model)
        if route.kind == pb.ROUTE_KIND_SPLIT:
            fraction = sticky_fraction(model, user) if user else self._rng.random()
            chosen = targets.pop(pick_arm([w for _, _, w in targets], fraction))
            targets.sort(key=lambda t: -t[2])
            targets.insert(0, chosen)
        deployments = tuple(
            self.deployment(self.registry.provider(p), name) for p, name, _ in targets
        )
        return RoutePlan(model, route.kind, deployments)

    # -- calling -------------------------------------------------------------

    async def _attempts(
        self,
        plan: RoutePlan,
        operation: Operation,
        call: Callable[[Deployment], Awaitable[T]],
        deadline: float | None,
        *,
        background: bool,
    ) -> tuple[Deployment, T]:
        """`call` on the plan's deployments until one succeeds: retried with backoff on
        the same deployment, then the next one. Returns with the winner's
        concurrency slot (of the call's lane) held: the caller releases it when done.

        A background call never takes a circuit's half-open probe and waits for
        a slot of its own lane only, up to its deadline: users go first."""
        errors: list[ServiceError] = []
        for deployment in plan.deployments:
            breaker = deployment.breaker(operation)
            if not breaker.allow(background=background):
                errors.append(_circuit_open(deployment, operation, self._clock(), background))
                if not background and self.on_refused is not None:
                    self.on_refused(deployment.provider.name)
                continue
            lane = deployment.lane(background)
            wait = self.policy.queue_timeout_seconds
            if deadline is not None:
                left = max(0.0, deadline - self._clock())
                # Background work is in no hurry: it waits its turn as long as it may.
                wait = left if background else min(wait, left)
            if not await lane.acquire(wait):
                breaker.abandon(background=background)
                errors.append(_busy(deployment, lane, background))
                continue
            outcome: tuple[Deployment, T] | None = None
            try:
                outcome = await self._retrying(
                    deployment, breaker, call, deadline, errors, background=background
                )
            finally:
                if outcome is None:
                    lane.release()
            if outcome is not None:
                return outcome
        final = _final_error(plan, errors)
        if all(e.reason in REFUSALS for e in errors):
            # Nothing reached an upstream (whose failures upstream_error logs):
            # the refusal is this call's one log line.
            refused(plan.deployments[0].provider.name, operation.value, final.reason, background)
            log.log(
                logging.INFO if background else logging.WARNING,
                "request refused",
                extra={
                    "model": plan.requested,
                    "operation": operation.value,
                    "lane": "background" if background else "user",
                    "reason": final.reason,
                    "detail": final.message,
                },
            )
        raise final

    async def _retrying(
        self,
        deployment: Deployment,
        breaker: CircuitBreaker,
        call: Callable[[Deployment], Awaitable[T]],
        deadline: float | None,
        errors: list[ServiceError],
        *,
        background: bool,
    ) -> tuple[Deployment, T] | None:
        """`call` on one deployment with retries; None (the error in `errors`) to fail over."""
        attempt = 0
        while True:
            try:
                result = await call(deployment)
            except ServiceError as exc:
                if exc.code not in DEPLOYMENT_FAILURES:
                    # The request's own problem (the upstream refused it as wrong,
                    # or cannot do it at all): no verdict on the deployment, and
                    # no other deployment will do better.
                    breaker.abandon(background=background)
                    raise
                breaker.failure(background=background)
                errors.append(exc)
                log.info(
                    "deployment failed",
                    extra={"model": deployment.id, "reason": exc.reason, "attempt": attempt + 1},
                )
                delay = self._retry_delay(exc, attempt, deadline)
                if delay is None or not breaker.allow(background=background):
                    return None
                await self._sleep(delay)
                attempt += 1
                continue
            except BaseException:
                # Cancelled (the caller left) or a bug: no verdict on the deployment.
                breaker.abandon(background=background)
                raise
            breaker.success()
            return deployment, result

    def _retry_delay(
        self, error: ServiceError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before trying the same deployment again; None: don't."""
        if attempt >= self.policy.retries or error.reason in NOT_RETRIED_REASONS:
            return None
        ceiling = self.policy.backoff_max_seconds
        backoff = min(ceiling, self.policy.backoff_base_seconds * 2**attempt)
        # "Equal jitter": never less than half the backoff, so retries stay spaced.
        delay: float = backoff / 2 + self._rng.random() * backoff / 2
        asked = retry_after_of(error)
        if asked is not None:
            if asked > ceiling:
                # Waiting that long inside one call helps nobody: fail over, or
                # let the caller see the upstream's own Retry-After.
                return None
            delay = max(delay, asked)
        if deadline is not None and self._clock() + delay >= deadline:
            return None
        return delay

    def stream(
        self,
        plan: RoutePlan,
        request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest,
        completion_id: str,
        created: int,
        deadline: float | None = None,
        *,
        background: bool = False,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """The chunks of a chat completion (or a text completion: chat chunks whose
        content is the text) from the first deployment that produces a first chunk;
        `background` for a call in the background lane. `accepted` is awaited
        each time a deployment's upstream accepts the request (more than once
        when one fails over before its first chunk)."""

        def open_stream(
            deployment: Deployment,
        ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
            provider, model = deployment.provider, deployment.model
            if isinstance(request, pb.StreamCompletionRequest):
                chunks = provider.stream_completion(
                    request, model, completion_id, created, accepted=accepted
                )
            elif (
                request.report_stop_sequence
                and request.sampling.stop
                and not provider.reports_stop_sequence
            ):
                # The upstream would stop without saying at which: stop here.
                chunks = matching_stops(
                    provider.stream_chat(
                        without_stops(request), model, completion_id, created, accepted=accepted
                    ),
                    request,
                )
            else:
                chunks = provider.stream_chat(
                    request, model, completion_id, created, accepted=accepted
                )
            if tracing.STATE.enabled and tracing.recording():
                from marie_providers.upstream import telemetry  # noqa: PLC0415 - tracing on only

                return telemetry.traced_stream(provider, model, request, chunks)
            return chunks

        return self._stream(plan, open_stream, request, deadline, background)

    async def _stream(
        self,
        plan: RoutePlan,
        open_stream: Callable[[Deployment], AsyncGenerator[pb.StreamChatCompletionResponse, None]],
        request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest,
        deadline: float | None,
        background: bool,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """The chunks of `open_stream` on the first deployment that produces a first chunk.

        The first-token timeout applies while another deployment is left to
        try: it is a reason to fail over, not to give up (the last deployment
        is bounded by the read timeout and the caller's deadline).
        """
        first_token_timeout = self.policy.first_token_timeout_seconds
        last = plan.deployments[-1]

        async def opened(
            deployment: Deployment,
        ) -> tuple[
            pb.StreamChatCompletionResponse, AsyncGenerator[pb.StreamChatCompletionResponse, None]
        ]:
            chunks = open_stream(deployment)
            limit = (
                first_token_timeout
                if first_token_timeout > 0
                and deployment is not last
                and not deployment.provider.first_chunk_is_whole_reply(request)
                else None
            )
            try:
                async with asyncio.timeout(limit):
                    first = await anext(chunks)
            except TimeoutError:
                await chunks.aclose()
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "FIRST_TOKEN_TIMEOUT",
                    f"{deployment.id} sent no first token within {first_token_timeout:g}s",
                    domain=DOMAIN,
                    metadata={"provider": deployment.provider.name},
                ) from None
            except StopAsyncIteration:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    "UPSTREAM_ERROR",
                    f"{deployment.id} ended the stream without a reply",
                    domain=DOMAIN,
                    metadata={"provider": deployment.provider.name},
                ) from None
            except BaseException:
                await chunks.aclose()
                raise
            return first, chunks

        if isinstance(request, pb.StreamChatCompletionRequest):
            plan = for_extras(plan, request.upstream_extras)
        operation = (
            Operation.COMPLETIONS
            if isinstance(request, pb.StreamCompletionRequest)
            else Operation.CHAT
        )
        deployment, (first, chunks) = await self._attempts(
            plan, operation, opened, deadline, background=background
        )
        # Committed: from here on an error reaches the caller, never a fallback.
        try:
            async with aclosing(chunks):
                yield first
                try:
                    async for chunk in chunks:
                        yield chunk
                except ServiceError as exc:
                    if exc.code in DEPLOYMENT_FAILURES:
                        deployment.breaker(operation).failure(background=background)
                    raise
        finally:
            deployment.lane(background).release()

    async def embed(
        self,
        plan: RoutePlan,
        request: pb.CreateEmbeddingsRequest,
        deadline: float | None = None,
        *,
        background: bool = False,
    ) -> pb.CreateEmbeddingsResponse:
        """Embeddings from the first deployment that answers."""

        async def call(deployment: Deployment) -> pb.CreateEmbeddingsResponse:
            provider, model = deployment.provider, deployment.model
            upstream_request, handling = provider.embedding_request(request)
            if tracing.STATE.enabled and tracing.recording():
                from marie_providers.upstream import telemetry  # noqa: PLC0415 - tracing on only

                response = await telemetry.traced_embed(
                    provider, model, lambda: provider.embed(upstream_request, model)
                )
            else:
                response = await provider.embed(upstream_request, model)
            response.input_handling = handling
            return response

        deployment, response = await self._attempts(
            plan, Operation.EMBEDDINGS, call, deadline, background=background
        )
        deployment.lane(background).release()
        return response

    # -- describing ----------------------------------------------------------

    def route_models(self, access: ModelAccess = UNRESTRICTED) -> list[pb.ModelInfo]:
        """Every alias and split as a ModelInfo naming what it routes to, by name;
        for a restricted caller, only the targets it may use (and only routes with one)."""
        out = []
        for name in sorted(self._routes):
            route = self._routes[name]
            allowed = self._allowed_targets(route, access)
            if not allowed:
                continue
            info = pb.ModelInfo(id=name, name=name)
            info.route.kind = route.kind
            targets = []
            for provider, model, weight in allowed:
                model_id = f"{provider}/{model}"
                info.route.targets.add(model=model_id, weight=weight)
                targets.append(f"{model_id} ({weight})" if weight else model_id)
            if route.kind == pb.ROUTE_KIND_ALIAS:
                info.description = "Alias: tries " + ", then ".join(targets)
            else:
                info.description = "Split by user: " + ", ".join(targets)
            info.metadata["routes_to"] = ",".join(f"{p}/{m}" for p, m, _ in allowed)
            out.append(info)
        return out

    def route_model(self, name: str, access: ModelAccess = UNRESTRICTED) -> pb.ModelInfo | None:
        """The ModelInfo of one alias or split; None when `name` is neither, or when
        the caller may use none of its targets."""
        if name not in self._routes:
            return None
        return next((m for m in self.route_models(access) if m.id == name), None)

    def deployment_health(self, provider: str) -> list[pb.DeploymentHealth]:
        """The routing state of `provider`'s known deployments, by model id."""
        offset = time.time() - self._clock()
        found = [d for (p, _), d in self._deployments.items() if p == provider]
        return [h for d in sorted(found, key=lambda d: d.id) for h in d.health(offset)]

    def close(self) -> None:
        """The service stopped: its breakers leave the metrics."""
        self._watch.close()

    def circuit_states(self) -> list[tuple[str, str, str, Circuit]]:
        """(provider, model id, operation, state) of every breaker, for the metrics."""
        return [
            (d.provider.name, d.id, operation.value, breaker.state)
            for d in self._deployments.values()
            for operation, breaker in d.breakers.items()
        ]


def for_extras(plan: RoutePlan, extras: pb.UpstreamExtras) -> RoutePlan:
    """The plan for a request carrying one upstream kind's own fields that
    must not be dropped (`fields`): only deployments of that kind serve it.
    The route's first choice must be one (else INVALID_ARGUMENT naming the
    field, as if the field were unknown there); fallbacks of another kind are
    left out, as they would drop what the caller asked for. Extras without
    `fields` are hints any deployment may serve without."""
    kind = extras.kind
    if not kind or not extras.fields:
        return plan
    first = plan.deployments[0]
    if first.provider.kind != kind:
        field_name = extras.fields[0]
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPSTREAM_EXTRAS_UNSUPPORTED",
            f"{field_name}: passed through to {kind} upstreams only;"
            f" {first.id} is served by {first.provider.kind}",
            domain=DOMAIN,
            metadata={"field": field_name, "provider": first.provider.name, "kind": kind},
        )
    return replace(plan, deployments=tuple(d for d in plan.deployments if d.provider.kind == kind))


def _split_id(model_id: str) -> tuple[str, str]:
    provider, _, model = model_id.partition("/")
    return provider, model


def _circuit_open(
    deployment: Deployment, operation: Operation, now: float, background: bool
) -> ServiceError:
    """CIRCUIT_OPEN, with the whole seconds until this call's lane may pass."""
    breaker = deployment.breaker(operation)
    retry_at = breaker.background_retry_at if background else breaker.retry_at
    wait = max(0.0, (retry_at or now) - now)
    seconds = max(1, math.ceil(wait))
    what = f"{deployment.id} ({operation.value})"
    if background:
        message = (
            f"{what} is recovering from {breaker.failures} failures in a row;"
            f" background work waits {seconds}s so that users' requests probe it first"
        )
    elif wait > 0:
        message = (
            f"{what} failed {breaker.failures} times in a row;"
            f" requests skip it for another {seconds}s"
        )
    else:
        message = f"{what} failed {breaker.failures} times in a row; a request is probing it now"
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "CIRCUIT_OPEN",
        message,
        domain=DOMAIN,
        metadata={
            "provider": deployment.provider.name,
            "model": deployment.id,
            "operation": operation.value,
            RETRY_AFTER_KEY: str(seconds),
        },
    )


def _busy(deployment: Deployment, lane: ConcurrencyLimit, background: bool) -> ServiceError:
    whose = "background calls" if background else "requests"
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DEPLOYMENT_BUSY",
        f"{deployment.id} is serving its limit of {lane.limit} {whose} at once",
        domain=DOMAIN,
        metadata={
            "provider": deployment.provider.name,
            "model": deployment.id,
            RETRY_AFTER_KEY: "1",
        },
    )


def _final_error(plan: RoutePlan, errors: list[ServiceError]) -> ServiceError:
    """The error a caller sees when no deployment could serve: the last one's, and for
    a routed name, which deployments were tried."""
    last = errors[-1]
    if plan.kind == pb.ROUTE_KIND_UNSPECIFIED:
        return last
    tried = ", ".join(dict.fromkeys(d.id for d in plan.deployments))
    return ServiceError(
        last.code,
        last.reason,
        f"no deployment of {plan.requested!r} could answer (tried {tried}); last: {last.message}",
        domain=last.domain,
        metadata={**last.metadata, "model": plan.requested},
    )
