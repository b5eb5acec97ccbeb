"""Memory handed back after large requests (marie_kit.memory)."""

from __future__ import annotations

import asyncio

import pytest
from marie_kit import memory


async def test_only_the_end_of_the_last_large_request_trims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: trims.append(1))
    monkeypatch.setattr(memory, "TRIM_DELAY_SECONDS", 0.01)
    large = memory.LargeRequests(threshold=100)

    assert not large.started(99)
    assert large.started(100) and large.started(5000)
    large.ended()
    await asyncio.sleep(0.05)
    assert trims == []  # one large request is still in flight
    large.ended()
    large.started(100)
    large.ended()  # asked twice before the first ran: one trim
    await asyncio.sleep(0.05)
    assert trims == [1]


def test_malloc_trim_runs_here() -> None:
    # glibc on our machines: the real call must work, not just be looked up.
    memory.malloc_trim()
