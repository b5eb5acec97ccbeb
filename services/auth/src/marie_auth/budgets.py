"""Budgets: spend limits of keys and owners per UTC day and month, and the
shared counters that hold every gateway and providers replica to them.

A budget belongs to a key or an owner (over every key it owns) and has a
daily and a monthly limit in picodollars (10⁻¹² USD; 0 is no limit). A
holder (a gateway or providers process) *leases* a share of what a key may
still spend — the least room of the key's budgets and its owner's — admits
requests from it without asking again, and comes back (in the background)
before it runs out, settling what its requests cost. The counters of a
subject count what its holders leased, net of what they gave back or owed;
they exist only while the subject has a budget, and a limit newly set starts
from what the usage ledger says was spent this day and month.

Like the rate-limit leases (`leases.py`), each lease is one `BEGIN IMMEDIATE`
transaction on the shared SQLite file, so auth replicas on the same file
agree (on OpenSearch, `OpenSearchBudgetStore` writes under optimistic
concurrency instead). `apply_budget_lease` is the arithmetic (pure), `SqliteBudgetStore`
the rows, `BudgetBook` the core the servicer calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol, TypeVar

from marie_kit.prices import MAX_PICODOLLARS
from marie_kit.sqlite import open_on_thread, write_transaction

from marie_auth.errors import invalid_argument

KEY = "key"
OWNER = "owner"
SECONDS_PER_DAY = 86_400
#: Share of the tightest limit one lease takes (1/20 = 5%), as for rate limits.
LEASE_FRACTION = 20
MAX_HOLDER = 128
MAX_SUBJECT = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    kind        TEXT NOT NULL,     -- 'key' or 'owner'
    subject     TEXT NOT NULL,     -- the key id or the owner
    daily       INTEGER NOT NULL,  -- picodollars per UTC day; 0: none
    monthly     INTEGER NOT NULL,  -- picodollars per UTC month; 0: none
    update_time REAL NOT NULL,
    PRIMARY KEY (kind, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spend_counters (
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    day         INTEGER NOT NULL,  -- days since the epoch (UTC)
    day_spend   INTEGER NOT NULL,
    month       INTEGER NOT NULL,  -- year * 12 + month - 1 (UTC)
    month_spend INTEGER NOT NULL,
    PRIMARY KEY (kind, subject)
) WITHOUT ROWID;
"""

T = TypeVar("T")


class Limit(IntEnum):
    """Which limit is tightest (the proto's BudgetLimit)."""

    NONE = 0
    KEY_DAILY = 1
    KEY_MONTHLY = 2
    OWNER_DAILY = 3
    OWNER_MONTHLY = 4


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """Picodollars per UTC day and month; 0 is no limit."""

    daily: int = 0
    monthly: int = 0

    @property
    def any(self) -> bool:
        return bool(self.daily or self.monthly)


@dataclass(frozen=True, slots=True)
class Budget:
    kind: str
    subject: str
    limits: BudgetLimits
    update_time: float = 0.0


@dataclass(slots=True)
class SpendCounters:
    day: int
    day_spend: int
    month: int
    month_spend: int


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    key_id: str
    holder: str
    spend: int = 0
    spend_balance: int = 0
    release: bool = False


@dataclass(frozen=True, slots=True)
class BudgetGrant:
    budgeted: bool
    spend: int = 0
    remaining: int = 0
    limit: Limit = Limit.NONE
    limit_amount: int = 0
    reset_seconds: float = 0.0
    lease_size: int = 0


def day_of(now: float) -> int:
    return int(now // SECONDS_PER_DAY)


def month_of(now: float) -> int:
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    return when.year * 12 + when.month - 1


def day_start(now: float) -> float:
    return float(day_of(now) * SECONDS_PER_DAY)


def month_start(now: float) -> float:
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    return dt.datetime(when.year, when.month, 1, tzinfo=dt.UTC).timestamp()


def next_month_start(now: float) -> float:
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()


def _rolled(counters: SpendCounters | None, now: float) -> SpendCounters:
    day, month = day_of(now), month_of(now)
    if counters is None:
        return SpendCounters(day, 0, month, 0)
    if counters.day != day:
        counters.day, counters.day_spend = day, 0
    if counters.month != month:
        counters.month, counters.month_spend = month, 0
    return counters


def apply_budget_lease(
    key_budget: BudgetLimits,
    key_counters: SpendCounters | None,
    owner_budget: BudgetLimits,
    owner_counters: SpendCounters | None,
    *,
    ask: BudgetAsk,
    now: float,
) -> tuple[SpendCounters | None, SpendCounters | None, BudgetGrant]:
    """Settle `ask`'s balance, then grant what the tightest limit leaves.

    Counters are kept for a subject only while it has a budget (None
    otherwise); the holder's balance settles into each kept counter."""
    if not (key_budget.any or owner_budget.any):
        return None, None, BudgetGrant(budgeted=False)
    kept: list[tuple[SpendCounters, BudgetLimits, Limit, Limit]] = []
    key_c = _rolled(key_counters, now) if key_budget.any else None
    owner_c = _rolled(owner_counters, now) if owner_budget.any else None
    if key_c is not None:
        kept.append((key_c, key_budget, Limit.KEY_DAILY, Limit.KEY_MONTHLY))
    if owner_c is not None:
        kept.append((owner_c, owner_budget, Limit.OWNER_DAILY, Limit.OWNER_MONTHLY))

    for counters, _, _, _ in kept:
        # Unused spend back (never below zero), or costs beyond the lease counted now.
        counters.day_spend = max(0, counters.day_spend - ask.spend_balance)
        counters.month_spend = max(0, counters.month_spend - ask.spend_balance)

    # The tightest limit: least room; its reset is the limit's period end.
    tightest: tuple[int, Limit, int, float] | None = None
    for counters, limits, daily, monthly in kept:
        for amount, spent, which, reset in (
            (limits.daily, counters.day_spend, daily, day_start(now) + SECONDS_PER_DAY - now),
            (limits.monthly, counters.month_spend, monthly, next_month_start(now) - now),
        ):
            if amount and (tightest is None or amount - spent < tightest[0]):
                tightest = (amount - spent, which, amount, reset)
    assert tightest is not None  # some budget is set
    room, limit, amount, reset = tightest
    lease_size = max(1, amount // LEASE_FRACTION)
    granted = 0
    if not ask.release:
        wanted = ask.spend or lease_size
        granted = max(0, min(wanted, room))
    for counters, _, _, _ in kept:
        counters.day_spend += granted
        counters.month_spend += granted
    grant = BudgetGrant(
        budgeted=True,
        spend=granted,
        remaining=max(0, room - granted),
        limit=limit,
        limit_amount=amount,
        reset_seconds=reset,
        lease_size=lease_size,
    )
    return key_c, owner_c, grant


def check_ask(ask: BudgetAsk) -> None:
    if not ask.key_id:
        raise invalid_argument("key_id", "key_id is required")
    if not ask.holder or len(ask.holder) > MAX_HOLDER:
        raise invalid_argument("holder", f"holder is required, at most {MAX_HOLDER} characters")
    if not 0 <= ask.spend <= MAX_PICODOLLARS:
        raise invalid_argument("spend", f"spend must be between 0 and {MAX_PICODOLLARS}")
    if abs(ask.spend_balance) > MAX_PICODOLLARS:
        raise invalid_argument("spend_balance", f"spend_balance must be within ±{MAX_PICODOLLARS}")


class BudgetStore(Protocol):
    """Where budgets and their counters live; `lease` is atomic per key."""

    async def lease(self, owner: str, ask: BudgetAsk, now: float) -> BudgetGrant: ...

    async def get(self, kind: str, subject: str) -> Budget | None: ...

    async def put(self, budget: Budget, seed: SpendCounters, now: float) -> None: ...

    async def list_page(self, after: tuple[str, str] | None, limit: int) -> list[Budget]: ...

    async def close(self) -> None: ...


_GET_BUDGET = "SELECT daily, monthly, update_time FROM budgets WHERE kind = ? AND subject = ?"
_GET_COUNTERS = (
    "SELECT day, day_spend, month, month_spend FROM spend_counters WHERE kind = ? AND subject = ?"
)
_PUT_COUNTERS = (
    "INSERT OR REPLACE INTO spend_counters (kind, subject, day, day_spend, month, month_spend) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class SqliteBudgetStore:
    """Budgets and counters in the auth SQLite file, on a connection and thread
    of their own (`synchronous = NORMAL` as for the rate-limit leases: a power
    cut may forget the last leases, never corrupt the file; the ledger keeps
    every cost regardless)."""

    def __init__(self, connection: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = connection
        self._executor = executor

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int = 0) -> SqliteBudgetStore:
        connection, executor = await open_on_thread(
            path, _SCHEMA, thread_name="marie-auth-budgets", max_bytes=max_bytes
        )
        connection.execute("PRAGMA synchronous = NORMAL")
        return cls(connection, executor)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _limits(self, kind: str, subject: str) -> BudgetLimits:
        row = self._db.execute(_GET_BUDGET, (kind, subject)).fetchone()
        return BudgetLimits(int(row[0]), int(row[1])) if row is not None else BudgetLimits()

    def _counters(self, kind: str, subject: str) -> SpendCounters | None:
        row = self._db.execute(_GET_COUNTERS, (kind, subject)).fetchone()
        return SpendCounters(*(int(v) for v in row)) if row is not None else None

    def _save(self, kind: str, subject: str, c: SpendCounters | None) -> None:
        if c is not None:
            self._db.execute(
                _PUT_COUNTERS, (kind, subject, c.day, c.day_spend, c.month, c.month_spend)
            )

    async def lease(self, owner: str, ask: BudgetAsk, now: float) -> BudgetGrant:
        return await self._run(functools.partial(self._lease, owner, ask, now))

    def _lease(self, owner: str, ask: BudgetAsk, now: float) -> BudgetGrant:
        key_budget = self._limits(KEY, ask.key_id)
        owner_budget = self._limits(OWNER, owner) if owner else BudgetLimits()
        if not (key_budget.any or owner_budget.any):
            return BudgetGrant(budgeted=False)  # read-only: nothing to lease
        with write_transaction(self._db):
            key_budget = self._limits(KEY, ask.key_id)
            owner_budget = self._limits(OWNER, owner) if owner else BudgetLimits()
            key_c, owner_c, grant = apply_budget_lease(
                key_budget,
                self._counters(KEY, ask.key_id),
                owner_budget,
                self._counters(OWNER, owner) if owner else None,
                ask=ask,
                now=now,
            )
            self._save(KEY, ask.key_id, key_c)
            if owner:
                self._save(OWNER, owner, owner_c)
        return grant

    async def get(self, kind: str, subject: str) -> Budget | None:
        def read() -> Budget | None:
            row = self._db.execute(_GET_BUDGET, (kind, subject)).fetchone()
            if row is None:
                return None
            return Budget(kind, subject, BudgetLimits(int(row[0]), int(row[1])), float(row[2]))

        return await self._run(read)

    async def put(self, budget: Budget, seed: SpendCounters, now: float) -> None:
        """Store the limits (none: delete them and their counters); counters
        are seeded with `seed` when the subject had none."""

        def write() -> None:
            key = (budget.kind, budget.subject)
            with write_transaction(self._db):
                if not budget.limits.any:
                    self._db.execute("DELETE FROM budgets WHERE kind = ? AND subject = ?", key)
                    self._db.execute(
                        "DELETE FROM spend_counters WHERE kind = ? AND subject = ?", key
                    )
                    return
                self._db.execute(
                    "INSERT OR REPLACE INTO budgets (kind, subject, daily, monthly, update_time) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (*key, budget.limits.daily, budget.limits.monthly, now),
                )
                if self._counters(*key) is None:
                    self._save(budget.kind, budget.subject, seed)

        await self._run(write)

    async def list_page(self, after: tuple[str, str] | None, limit: int) -> list[Budget]:
        def read() -> list[Budget]:
            start = after or ("", "")
            rows = self._db.execute(
                "SELECT kind, subject, daily, monthly, update_time FROM budgets "
                "WHERE (kind, subject) > (?, ?) ORDER BY kind, subject LIMIT ?",
                (*start, limit),
            ).fetchall()
            return [
                Budget(str(r[0]), str(r[1]), BudgetLimits(int(r[2]), int(r[3])), float(r[4]))
                for r in rows
            ]

        return await self._run(read)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class BudgetView:
    """A budget as GetBudget answers: limits, and what the ledger says was spent."""

    budget: Budget
    spent_today: int
    spent_this_month: int


class BudgetBook:
    """The budgets core: checks, reads a key's owner, leases, seeds from the ledger."""

    def __init__(
        self,
        store: BudgetStore,
        owner_of: Callable[[str], Awaitable[str]],
        spent: Callable[[str, str, float, float], Awaitable[int]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`owner_of(key_id)` raises NOT_FOUND for an unknown key; `spent(kind,
        subject, start, end)` is the ledger's cost total in picodollars."""
        self._store = store
        self._owner_of = owner_of
        self._spent = spent
        self._clock = clock

    async def lease(self, ask: BudgetAsk) -> BudgetGrant:
        check_ask(ask)
        owner = await self._owner_of(ask.key_id)
        return await self._store.lease(owner, ask, self._clock())

    async def _check_subject(self, kind: str, subject: str) -> None:
        if not subject or len(subject) > MAX_SUBJECT:
            field = "key_id" if kind == KEY else "owner"
            raise invalid_argument(field, f"{field} is required, at most {MAX_SUBJECT} characters")
        if kind == KEY:
            await self._owner_of(subject)  # NOT_FOUND for an unknown key

    async def get(self, kind: str, subject: str) -> BudgetView:
        await self._check_subject(kind, subject)
        now = self._clock()
        budget = await self._store.get(kind, subject) or Budget(kind, subject, BudgetLimits())
        return await self._view(budget, now)

    async def _view(self, budget: Budget, now: float) -> BudgetView:
        end = now + 1
        today = await self._spent(budget.kind, budget.subject, day_start(now), end)
        month = await self._spent(budget.kind, budget.subject, month_start(now), end)
        return BudgetView(budget, today, month)

    async def update(
        self, kind: str, subject: str, daily: int | None, monthly: int | None
    ) -> BudgetView:
        """Change the limits given (None: keep); returns the budget now."""
        await self._check_subject(kind, subject)
        now = self._clock()
        old = await self._store.get(kind, subject)
        limits = old.limits if old is not None else BudgetLimits()
        limits = BudgetLimits(
            limits.daily if daily is None else daily,
            limits.monthly if monthly is None else monthly,
        )
        budget = Budget(kind, subject, limits, now)
        view = await self._view(budget, now)
        seed = SpendCounters(day_of(now), view.spent_today, month_of(now), view.spent_this_month)
        await self._store.put(budget, seed, now)
        return BudgetView(
            budget if limits.any else Budget(kind, subject, limits),
            view.spent_today,
            view.spent_this_month,
        )

    async def carry(self, old_key_id: str, new_key_id: str) -> None:
        """A rotated key's budget goes to its successor, counting what the old
        key spent this day and month (the ledger keeps that under the old id)."""
        old = await self._store.get(KEY, old_key_id)
        if old is None:
            return
        now = self._clock()
        spent = await self._view(old, now)
        seed = SpendCounters(day_of(now), spent.spent_today, month_of(now), spent.spent_this_month)
        await self._store.put(Budget(KEY, new_key_id, old.limits, now), seed, now)

    async def list(self, page_size: int, page_token: str) -> tuple[list[BudgetView], str]:
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise invalid_argument("page_size", f"page_size must be between 0 and {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        after: tuple[str, str] | None = None
        if page_token:
            kind, sep, subject = page_token.partition(":")
            if not sep or kind not in (KEY, OWNER):
                raise invalid_argument("page_token", "page_token is not one this service gave")
            after = (kind, subject)
        budgets = await self._store.list_page(after, size + 1)
        more = len(budgets) > size
        budgets = budgets[:size]
        now = self._clock()
        views = [await self._view(b, now) for b in budgets]
        token = f"{budgets[-1].kind}:{budgets[-1].subject}" if more else ""
        return views, token

    async def close(self) -> None:
        await self._store.close()
