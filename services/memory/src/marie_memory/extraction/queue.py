"""The durable extraction queue: AddMemories jobs kept in the store and run in the
background lane, one at a time, surviving restarts and outages.

What a failed attempt means decides what happens next:

- **an outage** (providers or the model unreachable, 5xx, an open circuit,
  no answer before the deadline): the job stays queued and the whole queue
  pauses, retrying by time (a backoff doubling from
  MARIE_MEMORY_QUEUE_BACKOFF_SECONDS up to _MAX_BACKOFF_SECONDS, or the wait
  an open circuit names). No attempt limit: only a job older than
  MARIE_MEMORY_QUEUE_MAX_AGE_SECONDS is given up (failed, JOB_EXPIRED);
- **a bad answer** (not JSON, wrong schema, a loop): the extractor has
  already asked once more, stricter; the job fails for good with the reason;
  so does a request no retry can change (model unknown or not allowed);
- **a store error** (disk full, the cluster away): an attempt with backoff,
  like an outage, never a hot loop; the planned changes are kept (in this
  process) and written when the store is back, so the model is not asked
  (nor billed) again for them.

A finished job (succeeded or failed) leaves the queue and keeps its outcome
for 7 days: GetExtractionJob reports it. A job cut short by a crash runs again
(its changes may then be planned once more; the ADD/NONE dedupe absorbs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc
from marie_kit import tracing
from marie_kit.errors import ServiceError
from prometheus_client import Gauge

from marie_memory import lane
from marie_memory.core import MemoryCore
from marie_memory.errors import RETRY_AFTER_KEY
from marie_memory.job_payload import decode_request, decode_trace_context, encode_results
from marie_memory.records import JOB_FAILED, JOB_QUEUED, JOB_SUCCEEDED, ChangePlan, ExtractionJob

log = logging.getLogger("marie.memory.queue")

BATCH = 8
#: How long the replica that took a job holds it before another may run it
#: (an extraction is bounded far below this: its model calls have deadlines).
JOB_LEASE_SECONDS = 600.0
#: Reasons (of providers or the model, as memory reports them) that mean "wait".
OUTAGE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
#: Failures no retry would change, though their code says UNAVAILABLE.
FINAL_REASONS = frozenset({"EXTRACTION_FAILED"})
STORE_REASONS = frozenset({"STORE_UNAVAILABLE"})
EXPIRED = "JOB_EXPIRED"
MALFORMED = "MALFORMED_JOB"
STORE_ERROR = "STORE_ERROR"
#: How often, at most, the queue's size and oldest job are read from the store.
STATS_SECONDS = 1.0

QUEUE_DEPTH = Gauge(
    "marie_memory_extraction_queue_depth",
    "Extraction jobs queued (waiting or being retried), as last read from the store.",
)
OLDEST_AGE = Gauge(
    "marie_memory_extraction_oldest_job_age_seconds",
    "Seconds since the oldest queued extraction job was queued; 0 when none is.",
)


class _Oldest:
    """When the oldest queued job was queued (wall clock), for OLDEST_AGE: its
    age is computed when scraped, so it grows between two reads of the store."""

    time: float | None = None

    @classmethod
    def age(cls) -> float:
        return 0.0 if cls.time is None else max(0.0, time.time() - cls.time)


OLDEST_AGE.set_function(_Oldest.age)


class ExtractionQueue:
    """Runs queued AddMemories jobs one at a time in a background task."""

    def __init__(
        self,
        core: MemoryCore,
        *,
        poll_seconds: float,
        backoff_seconds: float,
        max_backoff_seconds: float = 30.0,
        max_age_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = core
        self._poll = poll_seconds
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Plans whose write failed, by job id: written without a new model call.
        self._plans: dict[str, ChangePlan] = {}
        # Outcomes the store could not record yet, by job id: recorded at the job's
        # next turn, without running it again.
        self._outcomes: dict[str, dict[str, Any]] = {}
        #: Jobs this replica took whose retry or outcome the store refused: their
        #: lease is this replica's, so it runs them again after its pause
        #: instead of leaving them until the lease ends.
        self._held: dict[str, ExtractionJob] = {}
        # Failed attempts in a row (outages, store errors): the pause grows with them.
        self._failures = 0
        self._paused_until = 0.0
        self._stats_read = -math.inf

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

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    async def _read_stats(self) -> None:
        """The queue's size and oldest job for /metrics, at most once per STATS_SECONDS."""
        now = time.monotonic()
        if now - self._stats_read < STATS_SECONDS:
            return
        self._stats_read = now
        store = self._core.store
        try:
            QUEUE_DEPTH.set(await store.count_jobs())
            _Oldest.time = await store.oldest_job_time()
        except Exception:  # the store is away: the last figures stay, the age grows
            log.debug("extraction queue stats not read", exc_info=True)

    async def _run(self) -> None:
        lane.enter_background()
        while True:
            self._wake.clear()
            await self._read_stats()
            jobs: list[ExtractionJob] = []
            try:
                if not self.paused:
                    jobs = await self._core.store.due_jobs(self._clock(), BATCH)
                    held = [j for j in self._held.values() if j.id not in {d.id for d in jobs}]
                    for job in [*held, *jobs]:
                        # Every replica's queue sees every job: one takes it. If
                        # that one dies, the job is due again after the lease.
                        if job.id not in self._held and not await self._core.store.take_job(
                            job.id, self._clock(), JOB_LEASE_SECONDS
                        ):
                            continue
                        if not await self._attempt(job):
                            break  # paused: the next jobs would meet the same outage
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store could not list the jobs
                self._pause(self._delay(None), "the store failed", repr(exc))
                log.debug("extraction queue failure", exc_info=True)
            if len(jobs) == BATCH and not self.paused:
                continue
            pause = self._paused_until - self._clock()
            if pause > 0:
                # A wake-up (a new job) does not cut a pause short: it would meet
                # the same outage.
                await asyncio.sleep(min(pause, self._max_backoff * 10))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    def _delay(self, asked: float | None) -> float:
        self._failures += 1
        if asked is not None:
            return max(asked, self._backoff)
        return min(self._max_backoff, self._backoff * 2.0 ** (self._failures - 1))

    def _pause(self, delay: float, why: str, error: str, job_id: str = "") -> None:
        self._paused_until = self._clock() + delay
        log.warning(
            f"extraction paused: {why}; will retry",
            extra={"job_id": job_id or None, "error": error, "retry_in_seconds": round(delay, 3)},
        )

    async def _attempt(self, job: ExtractionJob) -> bool:
        """Runs one job; False when the queue is paused by its failure. With
        tracing on, the attempt is the root span of a trace of its own, linked
        to the call that queued the job."""
        if not tracing.STATE.enabled:
            return await self._run_job(job)
        with tracing.linked_root_span(
            "memory.extraction_job",
            decode_trace_context(job.payload),
            {"marie.job_id": job.id, "marie.job.attempt": job.attempts + 1},
        ):
            return await self._run_job(job)

    async def _run_job(self, job: ExtractionJob) -> bool:
        store = self._core.store
        try:
            request = decode_request(job.payload)
        except (ValueError, TypeError, KeyError):
            log.error("a malformed extraction job failed", extra={"job_id": job.id})
            return await self._finish(
                job, state=JOB_FAILED, reason=MALFORMED, error="unreadable payload"
            )
        outcome = self._outcomes.get(job.id)
        if outcome is not None:  # only its outcome is left to record
            return await self._finish(job, **outcome)
        if self._clock() - job.create_time > self._max_age:
            log.error(
                "an extraction job expired",
                extra={"job_id": job.id, "attempts": job.attempts, "error": job.last_error},
            )
            return await self._finish(
                job,
                state=JOB_FAILED,
                reason=EXPIRED,
                error=f"not done within {self._max_age:g} s; last error: {job.last_error}",
            )

        async def wanted() -> bool:
            current = await store.get_job(job.user_id, job.id)
            return current is not None and current.state == JOB_QUEUED

        plan = self._plans.get(job.id)
        try:
            if plan is None:
                plan, _ = await self._core.plan_memories(request)
                self._plans[job.id] = plan
            written = await self._core.apply_planned(job.user_id, plan, wanted)
        except ServiceError as exc:
            return await self._failed(job, exc)
        except Exception as exc:  # the store failed: disk full, cluster away
            delay = self._delay(None)
            self._pause(delay, "the store failed", repr(exc), job.id)
            log.debug("extraction store failure", exc_info=True)
            await self._retry(job, delay, f"{STORE_ERROR}: {exc!r}")
            return False
        del self._plans[job.id]
        self._failures = 0
        if written is None:  # erased meanwhile (DeleteAllMemories): nothing to record
            self._held.pop(job.id, None)
            return True
        plan = written
        log.info(
            "extraction job done",
            extra={"job_id": job.id, "changes": len(plan.results), "attempts": job.attempts + 1},
        )
        return await self._finish(
            job, state=JOB_SUCCEEDED, results=encode_results(list(plan.results))
        )

    async def _failed(self, job: ExtractionJob, exc: ServiceError) -> bool:
        error = f"{exc.reason}: {exc.message}"
        if exc.reason in STORE_REASONS or (
            exc.code in OUTAGE_CODES and exc.reason not in FINAL_REASONS
        ):
            asked = exc.metadata.get(RETRY_AFTER_KEY)
            delay = self._delay(float(asked) if asked and asked.isdigit() else None)
            what = "the store failed" if exc.reason in STORE_REASONS else "the model is away"
            self._pause(delay, what, error, job.id)
            await self._retry(job, delay, error)
            return False
        # A bad answer (already asked once more) or a request no retry changes.
        self._plans.pop(job.id, None)
        self._failures = 0
        log.warning(
            "an extraction job failed",
            extra={"job_id": job.id, "reason": exc.reason, "error": exc.message},
        )
        return await self._finish(job, state=JOB_FAILED, reason=exc.reason, error=error)

    async def _retry(self, job: ExtractionJob, delay: float, error: str) -> None:
        try:
            await self._core.store.retry_job(job.id, self._clock() + delay, error)
        except Exception as exc:  # the store is failing too: the pause holds, in memory
            self._held[job.id] = job
            log.debug("could not record a retry", extra={"error": repr(exc)})
        else:
            self._held.pop(job.id, None)  # due again, for whichever replica takes it

    async def _finish(
        self,
        job: ExtractionJob,
        *,
        state: int,
        reason: str = "",
        error: str = "",
        results: str = "",
    ) -> bool:
        """Records a job's outcome; False (the queue paused) when the store fails."""
        outcome: dict[str, Any] = {
            "state": state,
            "reason": reason,
            "error": error,
            "results": results,
        }
        try:
            await self._core.store.finish_job(job.id, finish_time=self._clock(), **outcome)
        except Exception as exc:  # kept queued: its outcome is recorded at its next turn
            self._outcomes[job.id] = outcome
            self._held[job.id] = job
            self._pause(self._delay(None), "the store failed", repr(exc), job.id)
            log.debug("could not record an outcome", exc_info=True)
            return False
        self._outcomes.pop(job.id, None)
        self._held.pop(job.id, None)
        return True
