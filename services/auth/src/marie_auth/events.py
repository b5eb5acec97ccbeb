"""In-process fan-out of key events to WatchKeyEvents streams.

Every subscriber has its own bounded queue. A subscriber too slow to keep up
does not slow the others or grow memory: its backlog is thrown away and
replaced by one SYNC event, which tells it to drop its whole cache — so it
may lose precision but never a revocation.

Changes made through this process are published at once; changes made
through other processes on the same store (replicas, the CLI) are read from
the store's change log by `KeyManager.follow_events` and published here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("marie.auth.events")

#: Events a subscriber may fall behind by before it is re-synced.
DEFAULT_QUEUE_SIZE = 1024


class KeyEventType(StrEnum):
    """What happened (see KeyEventType in the proto)."""

    SYNC = "sync"
    REVOKED = "revoked"
    UPDATED = "updated"


@dataclass(frozen=True)
class KeyEvent:
    """One event: its type, the key it concerns ("" for SYNC) and when (unix seconds)."""

    type: KeyEventType
    key_id: str
    time: float


class Subscription:
    """One subscriber's bounded stream of events; iterate it with `async for`."""

    def __init__(self, queue_size: int, clock: Callable[[], float]) -> None:
        # None marks the end of the stream.
        self._queue: asyncio.Queue[KeyEvent | None] = asyncio.Queue(maxsize=queue_size)
        self._clock = clock
        self._ended = False
        self.resyncs = 0
        self._queue.put_nowait(self._sync())

    @property
    def pending(self) -> int:
        """Events queued and not yet read."""
        return self._queue.qsize()

    def _sync(self) -> KeyEvent:
        return KeyEvent(KeyEventType.SYNC, "", self._clock())

    def _clear(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def offer(self, event: KeyEvent) -> None:
        """Queue `event`; on overflow replace the whole backlog with one SYNC."""
        if self._ended:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._clear()
            self._queue.put_nowait(self._sync())
            self.resyncs += 1
            log.warning("event subscriber fell behind; sent SYNC", extra={"resyncs": self.resyncs})

    def end(self) -> None:
        """Finish the stream: the iterator stops after what is still queued, if it fits."""
        if self._ended:
            return
        self._ended = True
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            self._clear()
            self._queue.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> KeyEvent:
        event = await self._queue.get()
        if event is None:
            # Keep the marker so that further reads also end at once.
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return event


class KeyEventBroadcaster:
    """Publishes key events to every current subscriber, never blocking the publisher."""

    def __init__(
        self, queue_size: int = DEFAULT_QUEUE_SIZE, clock: Callable[[], float] = time.time
    ) -> None:
        if queue_size < 2:
            raise ValueError("queue_size must leave room for an event besides SYNC")
        self._queue_size = queue_size
        self._clock = clock
        self._subscribers: set[Subscription] = set()
        self._closed = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, event_type: KeyEventType, key_id: str) -> None:
        """Send an event about `key_id` to every subscriber."""
        event = KeyEvent(event_type, key_id, self._clock())
        for subscription in self._subscribers:
            subscription.offer(event)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription that starts with SYNC; unsubscribed when the block exits."""
        subscription = Subscription(self._queue_size, self._clock)
        if self._closed:
            subscription.end()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def close(self) -> None:
        """End every subscription; later subscriptions end right after their SYNC."""
        self._closed = True
        for subscription in self._subscribers:
            subscription.end()
