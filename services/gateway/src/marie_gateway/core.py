"""The state every gateway surface shares: settings, long-lived channels and
stubs, key checks, bounded body reading, and the shutdown of running calls."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie.memory.v1 import memory_service_pb2_grpc as memory_grpc
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit import tracing
from marie_kit.budgets import BudgetExceeded, BudgetHold, BudgetLeaser
from marie_kit.channels import insecure_channel
from marie_kit.leased_limits import LeasedLimiter
from marie_kit.limits import Limiter, LocalLimiter, RateLimited
from marie_kit.memory import LARGE_REQUEST_BYTES, schedule_trim
from marie_kit.prices import PriceTable
from marie_kit.usage import UsageRecorder
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request

from marie_gateway.access.keys import SCOPE_ADMIN, KeyValidator, Principal, extract_key
from marie_gateway.access.limits import InvalidKeyThrottle, budget_headers, quota_headers
from marie_gateway.access.tally import Tally
from marie_gateway.http.client_address import TrustedProxies, parse_networks
from marie_gateway.http.context import RATE_HEADERS_KEY, current_request_id
from marie_gateway.http.errors import (
    ApiError,
    client_closed,
    invalid_api_key,
    service_unavailable,
)
from marie_gateway.http.metrics import RATE_LIMITED
from marie_gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub
    from marie.memory.v1.memory_service_pb2_grpc import MemoryServiceAsyncStub
    from marie.providers.v1.provider_service_pb2_grpc import ProviderServiceAsyncStub

log = logging.getLogger("marie.gateway")

SHUTDOWN_MESSAGE = "The server is shutting down; retry the request."

# Where the request-context middleware finds what a request reserved of the
# body budget (and for whom), to give it back when the request ends.
BODY_RESERVATION_KEY = "marie.body_bytes"
BODY_HOLDER_KEY = "marie.body_holder"
# Where a limited request keeps its account (see `admit`); the `x-ratelimit-*`
# headers the request-context middleware adds to its answer are kept under
# RATE_HEADERS_KEY.
TALLY_KEY = "marie.tally"
#: The principal of MARIE_ADMIN_KEY.
ADMIN_PRINCIPAL = Principal(
    key_id="admin-env", owner="", scopes=frozenset({SCOPE_ADMIN}), allowed_models=()
)


class Cancellable(Protocol):
    """A running call that shutdown can end: a gRPC call, or several read as one."""

    def cancel(self) -> bool: ...


@dataclass
class Backends:
    """Long-lived channels and stubs, made once at start-up."""

    providers_channel: grpc.aio.Channel
    auth_channel: grpc.aio.Channel
    providers: ProviderServiceAsyncStub
    keys: KeyValidator
    memory_channel: grpc.aio.Channel
    memory: MemoryServiceAsyncStub
    auth: AuthServiceAsyncStub
    usage: UsageRecorder


class BodyBudget:
    """Bounds the request-body bytes held in memory at once: in all, and by
    any one holder (an API key, or a client address before its key is known).

    A request takes budget for the bytes that have arrived, as they arrive
    (never for what its Content-Length only promises: a client that declares
    16 MiB and sends ten bytes holds ten bytes), and gives it all back when it
    ends. One holder may hold at most `share` (at least the largest body), so
    no key can take the whole budget from the others, however many uploads it
    trickles. A request that cannot get budget waits, reading nothing more,
    until others give some back (within the body timeout, else 503)."""

    def __init__(self, limit: int, share: int) -> None:
        self.limit = limit
        self.share = min(share, limit)
        self.in_use = 0
        self._held: dict[str, int] = {}
        self._waiters = 0
        self._freed = asyncio.Condition()

    def _fits(self, holder: str, size: int) -> bool:
        return self.in_use + size <= self.limit and self._held.get(holder, 0) + size <= self.share

    async def take(self, holder: str, size: int) -> None:
        if not self._fits(holder, size):
            self._waiters += 1
            try:
                async with self._freed:
                    await self._freed.wait_for(lambda: self._fits(holder, size))
            finally:
                self._waiters -= 1
        self.in_use += size
        self._held[holder] = self._held.get(holder, 0) + size

    def give_back(self, holder: str, size: int) -> None:
        if size:
            self.in_use -= size
            left = self._held.get(holder, 0) - size
            if left > 0:
                self._held[holder] = left
            else:
                self._held.pop(holder, None)
            if self._waiters:
                asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()


class _BodyRead:
    """A request body being read, as shutdown ends it: its task cancelled,
    marked so the cancellation becomes a 503 rather than a cut connection."""

    __slots__ = ("cut", "task")

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cut = False

    def cancel(self) -> bool:
        self.cut = True
        return self.task.cancel()


class Gateway:
    """Settings and backends shared by the route modules, plus what every
    route does first: read the body within its bounds, check the key."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._backends: Backends | None = None
        # A quarter of the budget for any one holder, and the largest body at least.
        self.bodies = BodyBudget(
            settings.max_inflight_body_bytes,
            share=max(settings.max_body_bytes, settings.max_inflight_body_bytes // 4),
        )
        # Calls that a shutdown must end cleanly (see cut_calls).
        self.calls: set[Cancellable] = set()
        # Set when shutdown starts (readiness turns 503), and when the grace
        # period is nearly over (running calls are ended, new ones refused).
        self.draining = False
        self.shutting_down = False
        self.limiter: Limiter = LocalLimiter()
        # Budgets are always leased from auth (their counters outlive a process).
        self.budgets: BudgetLeaser | None = None
        # A bad price table stops the start, naming the file and the entry.
        self.prices = PriceTable.load(settings.config)
        admin = settings.admin_key.get_secret_value() if settings.admin_key else ""
        # Only a digest is kept; presented keys are compared digest to digest.
        self._admin_digest = hashlib.sha256(admin.encode()).digest() if admin else None
        self.proxies = TrustedProxies(parse_networks(settings.trusted_proxies))
        self.invalid_keys = InvalidKeyThrottle(
            settings.invalid_key_threshold, settings.invalid_key_window_seconds
        )

    def backends(self) -> Backends:
        assert self._backends is not None, "used before the lifespan started"
        return self._backends

    async def read_body(self, request: Request) -> bytes:
        """The whole body, within the size limit, the body time limit and the
        gateway's budget of in-flight body bytes."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        scope = request.scope
        if BODY_HOLDER_KEY not in scope:
            # Not authenticated (yet): the client's address holds its budget.
            peer = request.client.host if request.client else ""
            address = self.proxies.client(peer, request.headers.getlist("x-forwarded-for"))
            scope[BODY_HOLDER_KEY] = "address:" + address
        waiting = [False]
        # Shutdown's end of the grace period answers a body still arriving (or
        # waiting for budget) 503, as it does a running call (`cut_calls`).
        if self.shutting_down:
            raise service_unavailable(SHUTDOWN_MESSAGE)
        reading = _BodyRead()
        self.calls.add(reading)
        try:
            async with asyncio.timeout(self.settings.body_timeout_seconds):
                return await self._read_within_budget(request, limit, waiting)
        except asyncio.CancelledError:
            if not reading.cut:
                raise
            reading.task.uncancel()
            raise service_unavailable(SHUTDOWN_MESSAGE) from None
        except TimeoutError:
            if waiting[0]:
                # The client sent in time; the gateway had no room to read it.
                raise ApiError(
                    503,
                    "Too many request bodies are arriving at once; retry shortly.",
                    "server_error",
                    "service_unavailable",
                    retry_after=1,
                    close=True,
                ) from None
            raise ApiError(
                408,
                "The request body did not arrive in time.",
                code="request_timeout",
                close=True,
            ) from None
        except ClientDisconnect:
            raise client_closed() from None
        finally:
            self.calls.discard(reading)

    async def _read_within_budget(self, request: Request, limit: int, waiting: list[bool]) -> bytes:
        scope = request.scope
        holder: str = scope[BODY_HOLDER_KEY]
        chunks: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            if part:
                # Budget for what has arrived, before the next read.
                waiting[0] = True
                await self.bodies.take(holder, len(part))
                waiting[0] = False
                scope[BODY_RESERVATION_KEY] = scope.get(BODY_RESERVATION_KEY, 0) + len(part)
                chunks.append(part)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self, scope: dict[str, Any]) -> None:
        """Give back what the request reserved of the body budget."""
        reserved = scope.pop(BODY_RESERVATION_KEY, 0)
        if reserved:
            self.bodies.give_back(scope[BODY_HOLDER_KEY], reserved)
            if reserved >= LARGE_REQUEST_BYTES:
                # glibc keeps the freed heap of a large body: hand it back.
                schedule_trim()

    async def authenticate(self, request: Request) -> Principal:
        """The caller's principal from its key header; 401 without a valid key.

        A client address that presented too many invalid keys lately gets 429
        for any key not validated recently, without auth being asked."""
        # A span when auth is asked, an event on the request's when the key
        # is answered from the cache.
        with tracing.step("gateway.check_key") as step:
            principal = await self._authenticate(request)
            if step is not None:
                # The key's id, never the key.
                step.set_attribute("marie.key_id", principal.key_id)
        request.scope[BODY_HOLDER_KEY] = "key:" + principal.key_id
        return principal

    async def _authenticate(self, request: Request) -> Principal:
        headers = request.headers
        key = extract_key(headers.get("authorization"), headers.get("x-api-key"))
        keys = self.backends().keys
        if keys.refused_recently(key):
            # Counted against its address once, when it was refused.
            raise invalid_api_key()
        peer = request.client.host if request.client else ""
        address = self.proxies.client(peer, headers.getlist("x-forwarded-for"))
        wait = self.invalid_keys.retry_after(address)
        # A key that validated recently is never held back: only keys the
        # gateway has not seen valid (guesses) wait for the address's allowance.
        if wait and not keys.validated_recently(key):
            RATE_LIMITED.labels("invalid_keys").inc()
            raise ApiError(
                429,
                "Too many requests with invalid API keys from this address; slow down.",
                "requests",
                "rate_limit_exceeded",
                retry_after=max(1, math.ceil(wait)),
            )
        # The admin secret is checked after the slow-down: a throttled
        # address cannot keep guessing it either.
        if self._admin_digest is not None and hmac.compare_digest(
            hashlib.sha256(key.encode()).digest(), self._admin_digest
        ):
            keys.remember_valid(key)
            return ADMIN_PRINCIPAL
        try:
            return await keys.validate(key, current_request_id())
        except ApiError as exc:
            if exc.status == 401:
                self.invalid_keys.failed(address)
            raise

    async def admit(
        self, request: Request, principal: Principal, operation: str, *, tokens: bool = True
    ) -> Tally:
        """Admit the request within its key's limits, or 429 with `Retry-After`;
        either way the answer carries the key's `x-ratelimit-*` headers.

        A request that spends model capacity (`tokens`) is held to the token
        limits too and recorded in the usage ledger when it ends; one that
        does not counts against requests per minute and concurrency only."""
        hold: BudgetHold | None = None
        if tokens and self.budgets is not None:
            try:
                hold = await self.budgets.admit(principal.key_id)
            except BudgetExceeded as exc:
                RATE_LIMITED.labels(f"budget_{exc.limit}").inc()
                request.scope[RATE_HEADERS_KEY] = budget_headers(0, exc.resets_at)
                raise ApiError(
                    429,
                    exc.message,
                    "insufficient_quota",
                    "budget_exceeded",
                    retry_after=max(1, math.ceil(exc.reset_seconds)),
                ) from None
        try:
            # A span when the limiter asks auth (leases), else an event.
            with tracing.step("gateway.limits", {"marie.operation": operation}):
                grant = await self.limiter.acquire(
                    principal.key_id, principal.limits, tokens=tokens
                )
        except RateLimited as exc:
            if hold is not None and self.budgets is not None:
                self.budgets.settle(hold, 0)
            request.scope[RATE_HEADERS_KEY] = quota_headers(exc.requests, exc.tokens)
            RATE_LIMITED.labels(exc.limit).inc()
            kind = "tokens" if exc.limit.startswith("tokens") else "requests"
            raise ApiError(
                429,
                exc.message,
                kind,
                "rate_limit_exceeded",
                retry_after=max(1, math.ceil(exc.retry_after)),
            ) from None
        headers: list[tuple[bytes, bytes]] = []
        if grant.requests is not None or grant.tokens is not None:
            headers = quota_headers(grant.requests, grant.tokens)
        if hold is not None:
            headers = headers + budget_headers(hold.remaining)
        if headers:
            request.scope[RATE_HEADERS_KEY] = headers
        tally = Tally(
            principal,
            grant,
            self.limiter,
            operation,
            ledger=tokens,
            prices=self.prices,
            budgets=self.budgets,
            hold=hold,
        )
        request.scope[TALLY_KEY] = tally
        return tally

    def finish(self, scope: dict[str, Any], status: int) -> None:
        """The request has ended (its whole stream included): close its account."""
        tally: Tally | None = scope.pop(TALLY_KEY, None)
        if tally is not None and tally.finish() and tally.ledger and self._backends is not None:
            self._backends.usage.submit(tally.records(status))

    async def authorize(self, request: Request, scope: str) -> Principal:
        """The caller, with `scope`; 401/403 otherwise. A route that reaches a
        model then calls `admit` for its limits and its ledger row."""
        principal = await self.authenticate(request)
        principal.require_scope(scope)
        return principal

    async def enter(self, request: Request, scope: str) -> Principal:
        """The caller, with `scope`, admitted as a request that spends no
        tokens: lookups, memory and admin calls count against the key's
        requests per minute and concurrency, and answer with its
        `x-ratelimit-*` headers, but a key out of tokens can still make them.
        (`/api/usage` alone is not counted.)"""
        principal = await self.authorize(request, scope)
        if TALLY_KEY not in request.scope:  # once per request, however often asked
            await self.admit(request, principal, "request", tokens=False)
        return principal

    def track(self, call: Cancellable) -> None:
        """Register a long call that shutdown must end with a proper answer."""
        if self.shutting_down:
            call.cancel()
            raise service_unavailable(SHUTDOWN_MESSAGE)
        self.calls.add(call)

    def untrack(self, call: Cancellable) -> None:
        self.calls.discard(call)

    def cut_calls(self) -> None:
        """End every tracked call: the grace period is over. Each route sees
        its call cancelled while `shutting_down` is set and answers the client
        (an error event and `[DONE]` on streams) instead of being cut mid-air."""
        self.shutting_down = True
        if self.calls:
            log.warning("grace period over: ending %d call(s)", len(self.calls))
        for call in list(self.calls):
            call.cancel()

    def cut_by_shutdown(self) -> bool:
        """Whether a CancelledError seen now came from `cut_calls` (the call was
        cancelled) rather than from this task being cancelled."""
        task = asyncio.current_task()
        return self.shutting_down and (task is None or task.cancelling() == 0)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        providers_channel = insecure_channel(self.settings.providers_addr)
        # Auth and memory are reached at their replicas' own addresses
        # (compose's DNS name lists them all): only serving ones get calls.
        auth_channel = insecure_channel(self.settings.auth_addr, health_checked=True)
        keys = KeyValidator(
            auth_channel,
            cache_ttl=self.settings.key_cache_ttl_seconds,
            timeout=self.settings.control_timeout_seconds,
        )
        keys.start()
        # Every write the gateway makes to memory carries a request id.
        memory_channel = insecure_channel(
            self.settings.memory_addr, keyed_writes=True, health_checked=True
        )
        auth = auth_grpc.AuthServiceStub(auth_channel)
        usage = UsageRecorder(
            auth,
            max_queue=self.settings.usage_max_queue,
            batch_size=self.settings.usage_batch_size,
            flush_seconds=self.settings.usage_flush_seconds,
            timeout=self.settings.control_timeout_seconds,
            spool=self.settings.usage_spool_dir,
        )
        usage.start()
        budgets = BudgetLeaser(auth, timeout=self.settings.control_timeout_seconds)
        budgets.start()
        self.budgets = budgets
        leased: LeasedLimiter | None = None
        if self.settings.limits == "auth":
            leased = LeasedLimiter(auth)
            leased.start()
            self.limiter = leased
        self._backends = Backends(
            providers_channel,
            auth_channel,
            pb_grpc.ProviderServiceStub(providers_channel),
            keys,
            memory_channel,
            memory_grpc.MemoryServiceStub(memory_channel),
            auth,
            usage,
        )
        log.info(
            "gateway ready",
            extra={
                "providers": self.settings.providers_addr,
                "auth": self.settings.auth_addr,
                "limits": self.settings.limits,
            },
        )
        try:
            yield
        finally:
            self.shutting_down = True
            await keys.close()
            if leased is not None:
                await leased.close()
            self.budgets = None
            await budgets.close()
            # Requests have ended: what they used goes to the ledger now.
            await usage.close()
            await providers_channel.close()
            await auth_channel.close()
            await memory_channel.close()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body larger than {limit} bytes.", close=True)
