"""The event broadcaster: bounded per subscriber, SYNC instead of an unbounded backlog."""

from __future__ import annotations

import asyncio

from auth_testkit import FakeClock
from marie_auth.events import KeyEventBroadcaster, KeyEventType, Subscription


async def _drain(subscription: Subscription) -> list[tuple[KeyEventType, str]]:
    """Every event queued for `subscription` right now."""
    events: list[tuple[KeyEventType, str]] = []
    while subscription.pending:
        event = await asyncio.wait_for(anext(subscription), 1.0)
        events.append((event.type, event.key_id))
    return events


async def test_every_subscription_starts_with_sync() -> None:
    broadcaster = KeyEventBroadcaster(clock=FakeClock())

    with broadcaster.subscribe() as subscription:
        assert await _drain(subscription) == [(KeyEventType.SYNC, "")]


async def test_a_subscriber_that_falls_behind_gets_one_sync_instead_of_its_backlog() -> None:
    broadcaster = KeyEventBroadcaster(queue_size=3, clock=FakeClock())

    with broadcaster.subscribe() as subscription:
        for i in range(3):  # SYNC + 2 fill the queue; the third overflows it
            broadcaster.publish(KeyEventType.REVOKED, f"key_{i}")
        broadcaster.publish(KeyEventType.REVOKED, "key_after")

        assert await _drain(subscription) == [
            (KeyEventType.SYNC, ""),
            (KeyEventType.REVOKED, "key_after"),
        ]
        assert subscription.resyncs == 1


async def test_a_slow_subscriber_does_not_cost_a_fast_one_its_events() -> None:
    broadcaster = KeyEventBroadcaster(queue_size=2, clock=FakeClock())

    with broadcaster.subscribe() as slow, broadcaster.subscribe() as fast:
        received: list[tuple[KeyEventType, str]] = await _drain(fast)
        for i in range(3):
            broadcaster.publish(KeyEventType.UPDATED, f"key_{i}")
            received += await _drain(fast)

        assert received == [
            (KeyEventType.SYNC, ""),
            (KeyEventType.UPDATED, "key_0"),
            (KeyEventType.UPDATED, "key_1"),
            (KeyEventType.UPDATED, "key_2"),
        ]
        assert slow.resyncs > 0


async def test_leaving_the_block_unsubscribes() -> None:
    broadcaster = KeyEventBroadcaster(clock=FakeClock())

    with broadcaster.subscribe():
        assert broadcaster.subscriber_count == 1

    assert broadcaster.subscriber_count == 0


async def test_close_ends_current_and_later_subscriptions() -> None:
    broadcaster = KeyEventBroadcaster(clock=FakeClock())

    with broadcaster.subscribe() as current:
        broadcaster.close()
        with broadcaster.subscribe() as later:
            assert [e.type async for e in current] == [KeyEventType.SYNC]
            assert [e.type async for e in later] == [KeyEventType.SYNC]
