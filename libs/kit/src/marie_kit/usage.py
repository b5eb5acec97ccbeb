"""The usage recorder: ledger records sent to auth's `RecordUsage` off the
request path, shared by every service that records usage (the gateway for
the requests it serves, the memory service for its extraction calls).

It never blocks or fails its caller: records go into a bounded in-memory
queue, sent in batches every `flush_seconds` or as soon as `batch_size` are
waiting. A batch that auth does not acknowledge (auth down, timeout) stays
queued and is sent again (record ids make that harmless); a full queue drops
new records and counts them in `marie_usage_records_dropped_total`. Records
still queued at shutdown are sent then, within a few seconds; a process that
crashes loses what was not yet acknowledged (at most about one flush
interval's records). Acknowledged records are durable (auth commits a batch
before answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from prometheus_client import Counter

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
    ) -> None:
        self._stub = stub
        self._max = max_queue
        self._batch = batch_size
        self._interval = flush_seconds
        self._timeout = timeout
        self._queue: deque[auth_pb.UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, records: list[auth_pb.UsageRecord]) -> None:
        """Queue records; never blocks. A full queue drops them (counted)."""
        for record in records:
            if len(self._queue) >= self._max:
                USAGE_DROPPED.inc()
                continue
            self._queue.append(record)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-recorder")

    async def _run(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
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
                auth_pb.RecordUsageRequest(records=batch), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # Never accepted, however often sent: a bug, not an outage.
                log.error("usage batch refused: %s", exc.details())
                USAGE_DROPPED.inc(len(batch))
                return True
            log.warning("usage batch not recorded yet: %s", exc.code().name)
            # Back to the front, oldest first, within the queue's bound.
            room = max(0, self._max - len(self._queue))
            USAGE_DROPPED.inc(len(batch) - min(room, len(batch)))
            self._queue.extendleft(reversed(batch[:room]))
            return False
        USAGE_RECORDED.inc(len(batch))
        return True

    async def close(self) -> None:
        """Stop; send what is still queued, for a few seconds at most."""
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
            log.warning("usage records not recorded at shutdown: %d", len(self._queue))
