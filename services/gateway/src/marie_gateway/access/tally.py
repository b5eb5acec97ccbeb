"""A request's account: what one admitted request (chat, embeddings, compare,
…) used, charged to its key's limits, and the ledger rows it becomes.

A `Tally` charges its tokens to the key's limits the moment they are known
and gives its concurrency slot back when the request ends; then it becomes
ledger records (one per model) that the kit's `UsageRecorder` queues and
sends to auth in batches (never blocking the request; see `marie_kit.usage`).
Each record's cost is the price table's (`marie_kit.prices`) for the model
as resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from time import time as unix_time

from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.budgets import BudgetHold, BudgetLeaser
from marie_kit.limits import Grant, Limiter
from marie_kit.prices import NO_PRICES, Cost, PriceTable
from marie_kit.usage import new_record_id, timestamp

from marie_gateway.access.keys import Principal
from marie_gateway.http.metrics import provider_of

#: Status recorded for an answer that failed after it started (an error event).
FAILED_STREAM_STATUS = 502


@dataclass(slots=True)
class ModelUse:
    """Tokens one model used for the request (a comparison has several)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    failed: bool = False
    #: Answered from the response cache: no upstream call, no tokens.
    cached: bool = False
    #: Of prompt_tokens, those read from the upstream's prompt cache.
    cached_prompt_tokens: int = 0
    #: What it cost, priced once (`Tally.priced`): settling the budget and
    #: writing the ledger row read the same figure.
    cost: Cost | None = None


@dataclass(slots=True)
class Tally:
    """One admitted request's account."""

    principal: Principal
    grant: Grant
    limiter: Limiter
    #: "chat", "embeddings", "compare", … or "request" (spends no tokens).
    operation: str
    #: The model asked for, once the body is read (recorded if no answer came).
    requested: str = ""
    #: Unix time of admission, and the performance counter then.
    time: float = field(default_factory=unix_time)
    started: float = field(default_factory=perf_counter)
    uses: list[ModelUse] = field(default_factory=list)
    #: Whether the request goes into the usage ledger (it reaches a model).
    ledger: bool = True
    #: Set when the answer failed after it started (an error event).
    failed: bool = False
    finished: bool = False
    #: What the records' costs are computed from.
    prices: PriceTable = NO_PRICES
    #: The budget reservation, settled with the request's cost when it ends.
    budgets: BudgetLeaser | None = None
    hold: BudgetHold | None = None

    def add(self, model: str, usage: pb.Usage) -> None:
        """Count what `model` used; charged to the key's token limits at once."""
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cached = min(usage.cached_prompt_tokens, prompt)
        self.uses.append(ModelUse(model, prompt, completion, cached_prompt_tokens=cached))
        self.limiter.charge(self.grant, prompt + completion)

    def add_cached(self, model: str) -> None:
        """`model`'s answer came from the response cache: a ledger row marked
        cached, with no tokens (none were spent), charged to no token limit."""
        self.uses.append(ModelUse(model, 0, 0, cached=True))

    def add_failure(self, model: str) -> None:
        """`model` failed without reporting usage (one arm of a comparison)."""
        self.uses.append(ModelUse(model, 0, 0, failed=True))

    def refused(self, status: int) -> None:
        """The request was answered `status` by Marie itself: a 4xx before any
        model answered (bad body, unknown model, …) goes into no ledger."""
        if 400 <= status < 499 and not self.uses:  # 499: the client left, not refused
            self.ledger = False

    def finish(self) -> bool:
        """The request ended: free its slot. False when it had already ended."""
        if self.finished:
            return False
        self.finished = True
        self.limiter.release(self.grant)
        if self.hold is not None and self.budgets is not None:
            self.budgets.settle(self.hold, self.cost())
        return True

    def cost(self) -> int:
        """What the request cost so far, in picodollars (the sum of its records')."""
        return sum(self.priced(u).picodollars for u in self.uses)

    def priced(self, use: ModelUse) -> Cost:
        """`use`'s cost from the price table, computed on first asking."""
        if use.cost is None:
            use.cost = self.prices.cost(
                use.model, use.prompt_tokens, use.completion_tokens, use.cached_prompt_tokens
            )
        return use.cost

    def records(self, status: int) -> list[auth_pb.UsageRecord]:
        """The ledger records of the ended request, one per model."""
        latency_ms = (perf_counter() - self.started) * 1000
        at = timestamp(self.time)
        uses = self.uses or [ModelUse(self.requested, 0, 0)]
        out = []
        for use in uses:
            failed = use.failed or (self.failed and status < 400)
            cost = self.priced(use)
            out.append(
                auth_pb.UsageRecord(
                    id=new_record_id(),
                    key_id=self.principal.key_id,
                    owner=self.principal.owner,
                    provider=provider_of(use.model)[0],
                    model=use.model[:256],
                    operation=self.operation,
                    prompt_tokens=use.prompt_tokens,
                    completion_tokens=use.completion_tokens,
                    latency_ms=latency_ms,
                    status=FAILED_STREAM_STATUS if failed else status,
                    time=at,
                    cached=use.cached,
                    cached_prompt_tokens=use.cached_prompt_tokens,
                    cost_picodollars=cost.picodollars,
                    priced=cost.priced,
                )
            )
        return out
