"""The HTTP side of per-key limits: OpenAI's `x-ratelimit-*` headers, and the
slow-down of clients that keep presenting invalid keys.

The limits themselves (`Limits`, `LocalLimiter`, the leased limiter) are the
kit's (`marie_kit.limits`, `marie_kit.leased_limits`), shared with the
providers service, which holds gRPC calls through Envoy to the same limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from marie_kit.limits import SECONDS_PER_MINUTE, Quota
from marie_kit.prices import usd_text

#: The headers every answer of a limited route carries (for the key's limits).
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{name}"
    for name in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


def duration_text(seconds: float) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: "0s", "12ms", "1.5s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < SECONDS_PER_MINUTE:
        return f"{round(seconds, 3):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def quota_headers(requests: Quota | None, tokens: Quota | None) -> list[tuple[bytes, bytes]]:
    """The `x-ratelimit-*` headers for the limits a key has (none for unlimited ones)."""
    out: list[tuple[bytes, bytes]] = []
    for name, quota in ((b"requests", requests), (b"tokens", tokens)):
        if quota is not None:
            out.append((b"x-ratelimit-limit-" + name, str(quota.limit).encode()))
            out.append((b"x-ratelimit-remaining-" + name, str(quota.remaining).encode()))
            out.append((b"x-ratelimit-reset-" + name, duration_text(quota.reset_seconds).encode()))
    return out


#: What a budgeted key may still spend, in USD (exact decimal text): the
#: tightest of its own and its owner's daily and monthly budgets, as of this
#: gateway's last word with auth (other replicas' spend since is not in it).
BUDGET_REMAINING_HEADER = b"x-marie-budget-remaining"
#: When a refused budget resets (RFC 3339, UTC), on `budget_exceeded` answers.
BUDGET_RESET_HEADER = b"x-marie-budget-reset"


def budget_headers(remaining: int, resets_at: float | None = None) -> list[tuple[bytes, bytes]]:
    """The budget headers: `remaining` picodollars, and the reset time of a refusal."""
    out = [(BUDGET_REMAINING_HEADER, usd_text(max(0, remaining)).encode())]
    if resets_at is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets_at + 0.5))
        out.append((BUDGET_RESET_HEADER, when.encode()))
    return out


class InvalidKeyThrottle:
    """Slows down client addresses that keep presenting invalid keys.

    Each address has a bucket of `threshold` failures refilled over `window`
    seconds; while it is empty the address is refused (429) for keys not
    already known to be valid, without asking auth. Bounded memory: when
    `max_addresses` are tracked, the ones whose bucket refilled are dropped
    (and, if none has, all are)."""

    def __init__(
        self,
        threshold: int,
        window: float,
        *,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self._rate = threshold / window if threshold else 0.0
        self._max = max_addresses
        self._clock = clock
        # address -> (failure allowance left, when it was computed)
        self._addresses: dict[str, tuple[float, float]] = {}

    def _level(self, address: str, now: float) -> float:
        entry = self._addresses.get(address)
        if entry is None:
            return float(self.threshold)
        level, at = entry
        return min(float(self.threshold), level + (now - at) * self._rate)

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try an unknown key again; 0 when it may now."""
        if not self.threshold or address not in self._addresses:
            return 0.0
        level = self._level(address, self._clock())
        return 0.0 if level >= 1 else (1 - level) / self._rate

    def failed(self, address: str) -> None:
        if not self.threshold:
            return
        now = self._clock()
        if address not in self._addresses and len(self._addresses) >= self._max:
            self._sweep(now)
        self._addresses[address] = (max(0.0, self._level(address, now) - 1), now)

    def _sweep(self, now: float) -> None:
        for address in list(self._addresses):
            if self._level(address, now) >= self.threshold:
                del self._addresses[address]
        if len(self._addresses) >= self._max:
            self._addresses.clear()
