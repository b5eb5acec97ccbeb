"""The durable extraction queue: AddMemories jobs kept in the store and run in the
background, with retries and exponential backoff, surviving restarts.

A job is removed only once its extraction has been applied (or has failed for
good), so a crash or a restart at any point loses no queued turn; a job cut
short by a crash runs again (extraction is then applied once more, which the
ADD/NONE dedupe absorbs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from marie_kit.errors import ServiceError

from marie_memory.core import MemoryCore
from marie_memory.job_payload import decode_request
from marie_memory.records import ExtractionJob

log = logging.getLogger("marie.memory.queue")

BATCH = 8
#: How long the replica that took a job holds it before another may run it
#: (an extraction is bounded far below this: its model calls have deadlines).
JOB_LEASE_SECONDS = 600.0
# Errors worth another attempt: the providers service or the model may recover.
RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ExtractionQueue:
    """Runs queued AddMemories jobs one at a time in a background task."""

    def __init__(
        self,
        core: MemoryCore,
        *,
        poll_seconds: float,
        backoff_seconds: float,
        max_attempts: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = core
        self._poll = poll_seconds
        self._backoff = backoff_seconds
        self._max_attempts = max_attempts
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                jobs = await self._core.store.due_jobs(self._clock(), BATCH)
                for job in jobs:
                    # Every replica's queue sees every job: one takes it. If
                    # that one dies, the job is due again after the lease.
                    if await self._core.store.take_job(job.id, self._clock(), JOB_LEASE_SECONDS):
                        await self._attempt(job)
                if len(jobs) == BATCH:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("extraction queue failed; will retry")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake.clear()

    async def _attempt(self, job: ExtractionJob) -> None:
        store = self._core.store
        try:
            request = decode_request(job.payload)
        except (ValueError, TypeError, KeyError):
            log.error("dropped a malformed extraction job", extra={"job_id": job.id})
            await store.finish_job(job.id)
            return
        try:
            results, model = await self._core.add_memories(request)
        except ServiceError as exc:
            attempts = job.attempts + 1
            if exc.code in RETRIABLE and attempts < self._max_attempts:
                delay = self._backoff * 2 ** (attempts - 1)
                log.warning(
                    "extraction job failed; will retry",
                    extra={"job_id": job.id, "reason": exc.reason, "retry_in_seconds": delay},
                )
                await store.retry_job(job.id, self._clock() + delay, f"{exc.reason}: {exc}")
            else:
                log.error(
                    "extraction job dropped",
                    extra={"job_id": job.id, "reason": exc.reason, "attempts": attempts},
                )
                await store.finish_job(job.id)
            return
        await store.finish_job(job.id)
        log.info(
            "extraction job done",
            extra={"job_id": job.id, "model": model, "changes": len(results)},
        )
