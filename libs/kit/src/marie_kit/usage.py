"""The usage recorder: ledger records sent to auth's `RecordUsage` off the
request path, shared by every service that records usage (the gateway for
the requests it serves, the memory service for its extraction calls).

It never blocks or fails its caller: records go into a bounded in-memory
queue, sent in batches every `flush_seconds` or as soon as `batch_size` are
waiting. A batch that auth does not acknowledge (auth down, timeout) stays
queued and is sent again (record ids make that harmless); a full queue drops
new records and counts them in `marie_usage_records_dropped_total`. Records
still queued at shutdown are sent then, within a few seconds.

With a spool directory (`marie_kit.usage_spool`), every queued record is
also on local disk until auth acknowledges it: a process that is killed or
crashes, or stops while auth is away, loses none; the next recorder started
on that directory sends them. Without one, such a process loses what was not
yet acknowledged (about one flush interval's records). Acknowledged records
are durable (auth commits a batch before answering).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from prometheus_client import Counter

from marie_kit.usage_spool import ADOPT_SECONDS, Segment, Spool

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub

log = logging.getLogger("marie.usage")

_RETRY_MAX_SECONDS = 5.0
_CLOSE_SECONDS = 5.0
#: Defaults of the batching (the gateway's settings have the same).
MAX_QUEUE = 100_000
BATCH_SIZE = 200
FLUSH_SECONDS = 1.0
TIMEOUT_SECONDS = 10.0

USAGE_RECORDED = Counter(
    "marie_usage_records_recorded", "Usage records acknowledged by auth's ledger."
)
USAGE_DROPPED = Counter(
    "marie_usage_records_dropped",
    "Usage records given up on: the queue was full, or auth refused the batch.",
)


def new_record_id() -> str:
    """A ledger record id: 24 random hex digits."""
    return secrets.token_hex(12)


def timestamp(unix_seconds: float) -> Timestamp:
    at = Timestamp()
    at.FromNanoseconds(int(unix_seconds * 1e9))
    return at


#: A queued record and the spool segment holding it (None: not spooled).
_Entry = tuple[auth_pb.UsageRecord, Segment | None]


class UsageRecorder:
    """Queues usage records and sends them to auth in batches."""

    def __init__(
        self,
        stub: AuthServiceAsyncStub,
        *,
        max_queue: int = MAX_QUEUE,
        batch_size: int = BATCH_SIZE,
        flush_seconds: float = FLUSH_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        spool: Path | None = None,
    ) -> None:
        self._stub = stub
        self._max = max_queue
        self._batch = batch_size
        self._interval = flush_seconds
        self._timeout = timeout
        self._queue: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._spool = Spool(spool) if spool is not None else None
        self._adopted_at = time.monotonic()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, records: list[auth_pb.UsageRecord]) -> None:
        """Queue records (and spool them); never blocks. A full queue drops
        them (counted)."""
        room = max(0, self._max - len(self._queue))
        if len(records) > room:
            USAGE_DROPPED.inc(len(records) - room)
            records = records[:room]
        if not records:
            return
        segment = self._spooled(records)
        self._queue.extend((record, segment) for record in records)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def start(self) -> None:
        """Starts sending; first queues what a stopped process left in the spool."""
        if self._spool is not None:
            try:
                adopted = self._spool.open()
            except OSError as exc:
                log.warning(
                    "usage spool unusable: records are kept in memory only",
                    extra={"spool": str(self._spool.directory), "error": repr(exc)},
                )
                self._spool = None
            else:
                self._queue_adopted(adopted)
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    def _queue_adopted(self, adopted: list[tuple[auth_pb.UsageRecord, Segment]]) -> None:
        # Older than anything queued since: sent first, at once.
        self._queue.extendleft(reversed(adopted))
        if adopted:
            self._wake.set()

    def _adopt_orphans(self) -> None:
        """Takes over the segments of processes gone since (spool only)."""
        if self._spool is None or time.monotonic() - self._adopted_at < ADOPT_SECONDS:
            return
        self._adopted_at = time.monotonic()
        try:
            self._queue_adopted(self._spool.adopt())
        except OSError as exc:
            log.warning("usage spool not read", extra={"error": repr(exc)})

    def _spooled(self, records: list[auth_pb.UsageRecord]) -> Segment | None:
        if self._spool is None:
            return None
        try:
            return self._spool.append(records)
        except OSError as exc:  # a full disk: the records are still queued
            log.warning("usage records not spooled", extra={"error": repr(exc)})
            return None

    def _settle(self, entries: list[_Entry]) -> None:
        if self._spool is None:
            return
        per_segment = collections.Counter(s for _, s in entries if s is not None)
        for segment, count in per_segment.items():
            self._spool.settle(segment, count)

    async def _run(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            self._adopt_orphans()
            delay = self._interval
            while self._queue:
                if not await self._send_one():
                    # Auth did not take it: wait longer before trying again.
                    delay = min(_RETRY_MAX_SECONDS, delay * 2)
                    break
                if len(self._queue) < self._batch:
                    break

    async def _send_one(self) -> bool:
        """Send the oldest batch; True once auth acknowledged (or refused) it."""
        batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
        try:
            await self._stub.RecordUsage(
                auth_pb.RecordUsageRequest(records=[record for record, _ in batch]),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # Never accepted, however often sent: a bug, not an outage.
                log.error("usage batch refused: %s", exc.details())
                USAGE_DROPPED.inc(len(batch))
                self._settle(batch)
                return True
            log.warning("usage batch not recorded yet: %s", exc.code().name)
            # Back to the front, oldest first, within the queue's bound.
            room = max(0, self._max - len(self._queue))
            USAGE_DROPPED.inc(len(batch) - min(room, len(batch)))
            self._settle(batch[room:])
            self._queue.extendleft(reversed(batch[:room]))
            return False
        USAGE_RECORDED.inc(len(batch))
        self._settle(batch)
        return True

    async def close(self) -> None:
        """Stop; send what is still queued, for a few seconds at most. What is
        left stays in the spool, for the next recorder started on it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                while self._queue and await self._send_one():
                    pass
        except TimeoutError:
            pass
        if self._queue:
            log.warning(
                "usage records not recorded at shutdown: %d%s",
                len(self._queue),
                " (kept in the spool)" if self._spool is not None else "",
            )
        if self._spool is not None:
            self._spool.close()
