"""Spend budgets on the hot path: leases of what a key may still spend, taken
from auth's shared counters (`marie_auth.budgets`), for every process that
admits model requests (the gateway for its HTTP API, the providers service
for gRPC calls through Envoy).

A request's cost is known only when it ends, so admission works like the
token limits, with a reservation: each admitted request reserves the key's
*expected cost* out of this process's lease — the largest cost of its recent
requests here, or one lease (about 5% of the tightest limit) before any is
known — and settles its real cost when it ends (a stream that crosses the
budget finishes; its cost is counted in full). A request that finds the
lease short asks auth for more; when auth has no more to give, it is
refused with `BudgetExceeded` (429 `budget_exceeded`), saying which limit
and when it resets. Leases are topped up in the background before they run
out, and idle ones are given back, so only the first request of a key here,
or one at its budget, waits for auth.

Bound (stated in the top README): auth never grants past the tightest
limit's room, so spend passes a budget only by what requests cost beyond
their reservation (owed, and settled at once) — none while requests cost no
more than the largest recent one, or than one lease for a key's first
requests on a holder.

Keys without a budget: auth says so and this process does not ask again for
`RECHECK_SECONDS` (a budget set meanwhile applies within that time). When auth
cannot be reached, requests are admitted (an outage never refuses a key) and
their cost is owed, settled when auth answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb

from marie_kit.lease_holder import IDLE_SECONDS, LEASE_TIMEOUT_SECONDS, LeaseHolder
from marie_kit.prices import usd_text

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub

#: A key found without a budget is asked about again after this long.
RECHECK_SECONDS = 5.0
#: After a refusal, refuse without asking auth this long (a raised budget
#: applies after it).
REFUSAL_SECONDS = 1.0

#: The names of the limits, as errors and metrics say them.
LIMIT_NAMES = {
    auth_pb.BUDGET_LIMIT_KEY_DAILY: "key_daily",
    auth_pb.BUDGET_LIMIT_KEY_MONTHLY: "key_monthly",
    auth_pb.BUDGET_LIMIT_OWNER_DAILY: "owner_daily",
    auth_pb.BUDGET_LIMIT_OWNER_MONTHLY: "owner_monthly",
}
_DESCRIPTIONS = {
    "key_daily": "this API key's daily budget",
    "key_monthly": "this API key's monthly budget",
    "owner_daily": "its owner's daily budget",
    "owner_monthly": "its owner's monthly budget",
}


class BudgetExceeded(Exception):
    """A request refused: its key (or owner) has no budget left."""

    def __init__(self, limit: str, amount: int, reset_seconds: float) -> None:
        self.limit = limit
        self.amount = amount
        self.reset_seconds = max(0.0, reset_seconds)
        self.resets_at = time.time() + self.reset_seconds
        resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.resets_at + 0.5))
        what = _DESCRIPTIONS.get(limit, "this API key's budget")
        self.message = (
            f"Budget exceeded: {what} of {usd_text(amount)} USD is spent; it resets at {resets}."
        )
        super().__init__(self.message)


@dataclass(slots=True)
class BudgetHold:
    """An admitted request's reservation (settle it once, with its cost)."""

    key_id: str
    reserved: int
    #: Picodollars the key had left at admission (for the answer's header).
    remaining: int
    settled: bool = False


@dataclass(slots=True)
class _Lease:
    budgeted: bool | None = None
    checked: float = 0.0
    balance: int = 0
    expected: int = 0
    lease_size: int = 0
    remaining: int = 0
    limit: str = ""
    limit_amount: int = 0
    reset_seconds: float = 0.0
    in_flight: int = 0
    last_used: float = 0.0
    refused_until: float = 0.0
    renewing: asyncio.Task[None] | None = field(default=None)


class BudgetLeaser(LeaseHolder[_Lease]):
    """Admits requests within their key's budgets (see the module doc)."""

    HOLDER_SUFFIX = "-budget"
    UNREACHABLE_MESSAGE = "budgets unavailable: admitting requests, their cost is settled later"
    log = logging.getLogger("marie.budgets")

    def __init__(
        self,
        auth: AuthServiceAsyncStub,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = LEASE_TIMEOUT_SECONDS,
        recheck_seconds: float = RECHECK_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        super().__init__(auth, clock=clock, timeout=timeout, idle_seconds=idle_seconds)
        self._recheck = recheck_seconds

    # -- admission ---------------------------------------------------------

    async def admit(self, key_id: str) -> BudgetHold | None:
        """Reserve the key's expected cost, or raise `BudgetExceeded`. None:
        the key has no budget (or auth cannot say now): nothing to settle."""
        lease = self._leases.get(key_id)
        if lease is None:
            lease = self._leases[key_id] = _Lease()
        now = self._clock()
        lease.last_used = now
        if lease.budgeted is False:
            if now - lease.checked > self._recheck:
                self._renew_later(key_id, lease)
            return None
        if lease.budgeted is None:
            if now < self._auth_down_until or not await self._renew_or_fail(key_id, lease, 0):
                return None
            if not lease.budgeted:
                return None
        reserve = self._reserve(lease)
        if lease.balance < reserve:
            if now < lease.refused_until:
                raise self._refusal(lease)
            if now < self._auth_down_until:
                return self._hold(key_id, lease, 0)  # owed, settled when auth answers
            want = max(lease.lease_size, reserve - lease.balance)
            if not await self._renew_or_fail(key_id, lease, want):
                return self._hold(key_id, lease, 0)
            if not lease.budgeted:
                return None
            if lease.balance < reserve:
                lease.refused_until = self._clock() + REFUSAL_SECONDS
                raise self._refusal(lease)
        hold = self._hold(key_id, lease, reserve)
        if lease.balance * 2 < lease.lease_size:
            self._renew_later(key_id, lease)
        return hold

    @staticmethod
    def _reserve(lease: _Lease) -> int:
        """What a request reserves: the key's expected cost here, or, before
        any request of it ended here, one lease (about 5% of the tightest limit)."""
        return max(1, lease.expected or lease.lease_size)

    def _hold(self, key_id: str, lease: _Lease, reserve: int) -> BudgetHold:
        lease.balance -= reserve
        lease.in_flight += 1
        return BudgetHold(key_id, reserve, max(0, lease.remaining + lease.balance))

    def settle(self, hold: BudgetHold, cost: int) -> None:
        """The request ended and cost `cost` picodollars (idempotent)."""
        if hold.settled:
            return
        hold.settled = True
        lease = self._leases.get(hold.key_id)
        if lease is None:  # given back meanwhile: a new lease owes the cost
            lease = self._leases[hold.key_id] = _Lease(budgeted=True, last_used=self._clock())
        lease.in_flight = max(0, lease.in_flight - 1)
        lease.balance += hold.reserved - cost
        if cost > 0:
            # The largest recent cost, decaying by an eighth per request.
            lease.expected = max(cost, lease.expected - lease.expected // 8)
        if lease.balance < 0:
            self._renew_later(hold.key_id, lease)

    def _refusal(self, lease: _Lease) -> BudgetExceeded:
        return BudgetExceeded(lease.limit, lease.limit_amount, lease.reset_seconds)

    # -- leases --------------------------------------------------------------

    async def _renew_or_fail(self, key_id: str, lease: _Lease, want: int) -> bool:
        """Ask auth now (joining a call under way); False when it cannot be reached."""
        try:
            running = lease.renewing
            if running is not None and not running.done():
                await asyncio.shield(running)
                if lease.budgeted is not None and (
                    not lease.budgeted or lease.balance >= self._reserve(lease)
                ):
                    return True
            task = asyncio.create_task(self._ask(key_id, lease, want))
            lease.renewing = task
            await asyncio.shield(task)
        except grpc.aio.AioRpcError as exc:
            self._auth_unreachable(exc)
            return False
        return True

    async def _top_up(self, key_id: str, lease: _Lease) -> None:
        await self._ask(key_id, lease, 0)
        if lease.budgeted and lease.balance < 0:
            # Costs that ended during the call: owed, so settled at once
            # (a debt left standing is spend the other holders cannot see).
            await self._ask(key_id, lease, 0)

    def _holds(self, lease: _Lease) -> bool:
        return bool(lease.budgeted)

    async def _ask(self, key_id: str, lease: _Lease, want: int) -> None:
        # A debt is settled now; an unused balance stays for the next requests.
        settle = min(0, lease.balance)
        request = auth_pb.LeaseBudgetRequest(
            key_id=key_id, holder=self.holder, spend=want, spend_balance=settle
        )
        try:
            answer = await self._auth.LeaseBudget(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            answer = auth_pb.LeaseBudgetResponse(budgeted=False)  # not a stored key
        self._auth_answered()
        lease.checked = self._clock()
        lease.budgeted = answer.budgeted
        if not answer.budgeted:
            lease.balance = 0
            return
        lease.balance += answer.spend - settle
        lease.lease_size = answer.lease_size
        lease.remaining = answer.remaining
        lease.limit = LIMIT_NAMES.get(answer.limit, "")
        lease.limit_amount = answer.limit_amount
        lease.reset_seconds = answer.reset_seconds

    async def _give_back(self, key_id: str, lease: _Lease) -> None:
        request = auth_pb.LeaseBudgetRequest(
            key_id=key_id, holder=self.holder, spend_balance=lease.balance, release=True
        )
        await self._auth.LeaseBudget(request, timeout=self._timeout)

    async def _sweep(self) -> None:
        now = self._clock()
        for key_id, lease in list(self._leases.items()):
            if self._busy(lease) or lease.in_flight or now - lease.last_used <= self._idle:
                continue
            del self._leases[key_id]
            if lease.budgeted and lease.balance:
                await self._give_back(key_id, lease)
