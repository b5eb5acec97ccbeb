"""Per-key limits and the usage ledger for gRPC calls that come through Envoy.

The gateway's key check (Envoy's ext_authz) adds `x-marie-limits`
(`marie_kit.limits.LIMITS_HEADER`), beside the key's id and owner, to the
calls through Envoy of the services that meter them. `MeteringInterceptor`,
on such a service (providers, memory), then does for a call what the
gateway does for an HTTP request. For a call that spends model capacity, it:

- admits it against the key's limits with a `Limiter` (the kit's, as the
  gateway's; with leases from auth both draw on the same counters), or
  refuses it with RESOURCE_EXHAUSTED, ErrorInfo reason `RATE_LIMITED`
  (metadata `limit`: requests, tokens, tokens_per_day or concurrency;
  `retry_after_seconds`) and a `retry-after` trailer;
- charges the tokens its answer reports as soon as they arrive;
- holds its concurrency slot until the call ends: the stream's last message,
  an error, or the client going away;
- queues one usage-ledger record when it ends (never blocking it).

A call that spends none (a lookup: `COUNTED`) is admitted against the
key's requests per minute and concurrency only, and is not in the ledger.

A call without the header is one the deployment made itself (the gateway's
own calls, already limited and recorded; the memory service's): it passes
untouched, at the cost of one look through its metadata. The header is
trusted because Envoy strips every client-sent `x-marie-*` header; a
malformed one is a deployment fault (the key check and this service out of
step), refused with INTERNAL rather than served unlimited.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from time import perf_counter
from time import time as unix_time
from typing import Any

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc

from marie_kit.budgets import BudgetExceeded, BudgetHold, BudgetLeaser
from marie_kit.channels import insecure_channel
from marie_kit.errors import ServiceError
from marie_kit.identity import KEY_ID_HEADER, identity_from_metadata
from marie_kit.interceptors import Handler, rewrap
from marie_kit.leased_limits import LeasedLimiter
from marie_kit.limits import (
    LIMITS_HEADER,
    Grant,
    Limiter,
    Limits,
    LocalLimiter,
    RateLimited,
    parse_limits_value,
)
from marie_kit.prices import NO_PRICES, PriceTable
from marie_kit.settings import AuthClientSettings
from marie_kit.usage import UsageRecorder, new_record_id, timestamp

log = logging.getLogger("marie.metering")

RATE_LIMITED = "RATE_LIMITED"
BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
BAD_METERING_METADATA = "BAD_METERING_METADATA"
RETRY_AFTER = "retry-after"

#: Where ledger records go (the kit's `UsageRecorder.submit`); never blocks.
UsageSink = Callable[[list[auth_pb.UsageRecord]], None]

#: The ledger keeps HTTP statuses (400 and above count as errors): a call's
#: gRPC code as the HTTP status Google's API guidelines map it to.
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


@dataclass(frozen=True, slots=True)
class Report:
    """What one answer message says: who served it and, once known, the tokens."""

    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Whether the message carries the call's token counts.
    has_usage: bool = False
    #: Whether the answer came from the response cache: its token counts are
    #: the original call's, charged to nobody (the ledger row says cached).
    cached: bool = False
    #: Of prompt_tokens, those read from the upstream's prompt cache.
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Metered:
    """How to meter one RPC: its ledger operation, the model its request asks
    for (recorded when no answer names one), and what an answer message says.
    One that does not `spends_tokens` is only counted (no tokens, no ledger)."""

    operation: str
    requested: Callable[[Any], tuple[str, str]]
    read: Callable[[Any], Report]
    spends_tokens: bool = True


def _nothing(message: Any) -> Report:
    return Report("", "")


#: An RPC that spends no model capacity: counted against the key's requests
#: per minute and concurrency, not held to its token limits, not recorded.
COUNTED = Metered("request", lambda request: ("", ""), _nothing, spends_tokens=False)


@dataclass(frozen=True, slots=True)
class Marker:
    """A call's metering metadata, parsed: whose key, and its limits."""

    key_id: str
    owner: str
    limits: Limits


def marker_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> Marker | None:
    """The call's marker; None without `LIMITS_HEADER` (not metered).

    ValueError when it is there but unusable: not text, malformed, or
    without the key id to charge."""
    raw = next((v for k, v in metadata or () if k == LIMITS_HEADER), None)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"{LIMITS_HEADER} is not text")
    limits = parse_limits_value(raw)
    key_id, owner = identity_from_metadata(metadata)
    if not key_id:
        raise ValueError(f"{LIMITS_HEADER} comes without {KEY_ID_HEADER}")
    return Marker(key_id, owner, limits)


def rate_limited(exc: RateLimited, domain: str) -> ServiceError:
    """RESOURCE_EXHAUSTED for a refused call, saying which limit and when to retry."""
    wait = str(max(1, math.ceil(exc.retry_after)))
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        RATE_LIMITED,
        exc.message,
        domain=domain,
        metadata={"limit": exc.limit, "retry_after_seconds": wait},
        trailers={RETRY_AFTER: wait},
    )


def budget_exceeded(exc: BudgetExceeded, domain: str) -> ServiceError:
    """RESOURCE_EXHAUSTED for a call refused by a budget, saying which and when it resets."""
    wait = str(max(1, math.ceil(exc.reset_seconds)))
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        BUDGET_EXCEEDED,
        exc.message,
        domain=domain,
        metadata={"limit": exc.limit, "retry_after_seconds": wait},
        trailers={RETRY_AFTER: wait},
    )


def status_of(exc: BaseException | None) -> grpc.StatusCode:
    """The code a call ends with when its handler ended with `exc` (None: OK)."""
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, Exception):
        return grpc.StatusCode.INTERNAL
    # CancelledError, GeneratorExit: the client went away (or its deadline passed).
    return grpc.StatusCode.CANCELLED


class _Call:
    """One admitted call's account; `with` it around the call, and `on_end`
    gets it with the code the call ended with (however it ended)."""

    __slots__ = (
        "cached",
        "cached_prompt",
        "completion",
        "grant",
        "hold",
        "marker",
        "metered",
        "model",
        "on_end",
        "prompt",
        "provider",
        "started",
        "time",
    )

    def __init__(
        self,
        marker: Marker,
        metered: Metered,
        grant: Grant,
        request: Any,
        on_end: Callable[[_Call, grpc.StatusCode], None],
    ) -> None:
        self.marker = marker
        self.metered = metered
        self.grant = grant
        self.on_end = on_end
        self.time = unix_time()
        self.started = perf_counter()
        self.provider, self.model = metered.requested(request)
        self.prompt = self.completion = self.cached_prompt = 0
        #: Answered from the response cache (a ledger row with no tokens).
        self.cached = False
        self.hold: BudgetHold | None = None

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        self.on_end(self, status_of(exc))


class MeteringInterceptor(grpc.aio.ServerInterceptor):
    """Meters the calls that carry `LIMITS_HEADER` (see the module's docstring).

    `methods` names the RPCs that spend capacity (`/package.Service/Method`);
    a marked call of another method passes unmetered. Calls are metered once
    `start` has given the limiter and the ledger; before, a marked call is
    refused with UNAVAILABLE (the service is not ready)."""

    def __init__(
        self, domain: str, methods: Mapping[str, Metered], prices: PriceTable = NO_PRICES
    ) -> None:
        self.domain = domain
        self.methods = methods
        #: What each ledger record's cost is computed from (MARIE_CONFIG `prices`).
        self.prices = prices
        self._limiter: Limiter | None = None
        self._usage: UsageSink | None = None
        self._budgets: BudgetLeaser | None = None

    def start(
        self, limiter: Limiter, usage: UsageSink, budgets: BudgetLeaser | None = None
    ) -> None:
        self._limiter = limiter
        self._usage = usage
        self._budgets = budgets

    def stop(self) -> None:
        self._limiter = self._usage = None
        self._budgets = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        # The hot path: the gateway's own calls carry no marker (a plain loop,
        # no generator: this runs on every call).
        for name, _ in metadata or ():
            if name == LIMITS_HEADER:
                break
        else:
            return handler
        if handler is None:
            return handler
        metered = self.methods.get(handler_call_details.method)
        if metered is None:
            return handler
        try:
            marker = marker_of(metadata)
        except ValueError as exc:
            log.error("refused a call with bad metering metadata: %s", exc)
            return _refusing(
                handler,
                ServiceError(
                    grpc.StatusCode.INTERNAL,
                    BAD_METERING_METADATA,
                    f"the key check's metering metadata is malformed: {exc}",
                    domain=self.domain,
                    metadata={"header": LIMITS_HEADER},
                ),
            )
        assert marker is not None
        return rewrap(
            handler,
            lambda behavior: self._unary(behavior, marker, metered),
            lambda behavior: self._stream(behavior, marker, metered),
        )

    async def _admit(self, marker: Marker, metered: Metered, request: Any) -> _Call:
        limiter = self._limiter
        if limiter is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "NOT_READY",
                "the service is not started",
                domain=self.domain,
            )
        hold: BudgetHold | None = None
        budgets = self._budgets
        if budgets is not None and metered.spends_tokens:
            try:
                hold = await budgets.admit(marker.key_id)
            except BudgetExceeded as exc:
                raise budget_exceeded(exc, self.domain) from None
        try:
            grant = await limiter.acquire(
                marker.key_id, marker.limits, tokens=metered.spends_tokens
            )
        except RateLimited as exc:
            if hold is not None and budgets is not None:
                budgets.settle(hold, 0)
            raise rate_limited(exc, self.domain) from None
        call = _Call(marker, metered, grant, request, self._finish)
        call.hold = hold
        return call

    def _read(self, call: _Call, response: Any) -> None:
        report = call.metered.read(response)
        if report.model:
            call.provider, call.model = report.provider, report.model
        if report.cached:
            call.cached = True
        elif report.has_usage:
            call.prompt += report.prompt_tokens
            call.completion += report.completion_tokens
            call.cached_prompt += min(report.cached_prompt_tokens, report.prompt_tokens)
            if self._limiter is not None:
                self._limiter.charge(call.grant, report.prompt_tokens + report.completion_tokens)

    def _finish(self, call: _Call, code: grpc.StatusCode) -> None:
        """The call ended: free its slot, queue its ledger record."""
        if self._limiter is not None:
            self._limiter.release(call.grant)
        settling = call.hold is not None and self._budgets is not None
        recording = self._usage is not None and call.metered.spends_tokens
        if not (settling or recording):
            return  # nothing reads the cost: no price lookup
        cost = self.prices.cost(call.model, call.prompt, call.completion, call.cached_prompt)
        if settling:
            assert call.hold is not None and self._budgets is not None
            self._budgets.settle(call.hold, cost.picodollars)
        if not recording:
            return
        assert self._usage is not None
        self._usage(
            [
                auth_pb.UsageRecord(
                    id=new_record_id(),
                    key_id=call.marker.key_id,
                    owner=call.marker.owner,
                    provider=call.provider[:256],
                    model=call.model[:256],
                    operation=call.metered.operation,
                    prompt_tokens=call.prompt,
                    completion_tokens=call.completion,
                    latency_ms=(perf_counter() - call.started) * 1000,
                    status=HTTP_STATUS.get(code, 500),
                    time=timestamp(call.time),
                    cached=call.cached,
                    cached_prompt_tokens=call.cached_prompt,
                    cost_picodollars=cost.picodollars,
                    priced=cost.priced,
                )
            ]
        )

    def _stream(
        self, behavior: Any, marker: Marker, metered: Metered
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            # The call's end, whatever it is (the last answer, an error, the
            # client cancelling: CancelledError or GeneratorExit), closes it.
            with await self._admit(marker, metered, request) as call:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        self._read(call, response)
                        yield response

        return stream

    def _unary(
        self, behavior: Any, marker: Marker, metered: Metered
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def unary(request: Any, context: Any) -> Any:
            with await self._admit(marker, metered, request) as call:
                response = await behavior(request, context)
                if response is not None:
                    self._read(call, response)
                return response

        return unary


def _refusing(handler: Handler, error: ServiceError) -> Handler | None:
    """A handler of the same kind as `handler` that raises `error`."""

    async def refuse_unary(request: Any, context: Any) -> Any:
        raise error

    async def refuse_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        raise error
        yield  # a generator, as the kind of handler requires

    return rewrap(handler, lambda _: refuse_unary, lambda _: refuse_stream)


@dataclass
class MeteringBackends:
    """What a `MeteringInterceptor` meters with: the channel to auth, the
    usage recorder (which the service may use for its own ledger rows) and
    the limiter, local or leased from auth (`settings.limits`)."""

    auth_channel: grpc.aio.Channel
    usage: UsageRecorder
    limiter: Limiter
    leased: LeasedLimiter | None
    budgets: BudgetLeaser

    @classmethod
    def start(cls, settings: AuthClientSettings) -> MeteringBackends:
        # A channel connects lazily: nothing is asked of auth until a metered
        # call comes (or the recorder has records to send).
        channel = insecure_channel(settings.auth_addr, health_checked=True)
        auth = auth_grpc.AuthServiceStub(channel)
        usage = UsageRecorder(auth, spool=settings.usage_spool_dir)
        usage.start()
        leased = LeasedLimiter(auth) if settings.limits == "auth" else None
        if leased is not None:
            leased.start()
        # Budgets are always leased from auth (their counters outlive a process).
        budgets = BudgetLeaser(auth)
        budgets.start()
        return cls(channel, usage, leased or LocalLimiter(), leased, budgets)

    async def close(self) -> None:
        if self.leased is not None:
            await self.leased.close()
        await self.budgets.close()
        # Calls have ended: what they used goes to the ledger now.
        await self.usage.close()
        await self.auth_channel.close()
