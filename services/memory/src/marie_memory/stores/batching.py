"""Concurrent callers' OpenSearch requests sent as one: writes in one `_bulk`
(group commit: one round trip and one translog fsync serve them all), realtime
reads by id in one `_mget`.

A caller's request is sent at once unless `MAX_IN_FLIGHT` requests of its
kind are in flight; callers that come meanwhile wait for one of them to end,
then go out together in the next. Nothing waits for a timer, so a lone call
pays no extra latency. Each caller gets the results of its own parts only,
and decides what an item's error means for it: one refused write fails its
caller alone. When the request itself fails (the node unreachable, timed out
or failing), every caller in it gets UNAVAILABLE and nothing is acknowledged.
Durability stays the node's (`index.translog.durability: request`): a write
is answered only after its translog is synced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from opensearchpy import AsyncOpenSearch, TransportError
from opensearchpy import ConnectionError as NodeUnreachable

from marie_memory.errors import store_unreachable

log = logging.getLogger("marie.memory.opensearch")

#: Operations of a bulk request; all but `delete` are followed by a body.
OPERATIONS = ("create", "index", "update", "delete")
#: At most this many parts (operations, documents) in one request; more wait
#: for the next.
MAX_PARTS = 1000
#: Requests of one kind in flight at once; calls made meanwhile wait for one to
#: end, then go out together. Two rather than one: a call need not wait for a
#: whole request begun just before it (measured at concurrency 16 here: turns'
#: p95 lower in three interleaved rounds of three, p50 within the noise).
MAX_IN_FLIGHT = 2

Action = Mapping[str, Any]
Item = dict[str, Any]
Part = TypeVar("Part")
Result = TypeVar("Result")


@dataclass
class _Call(Generic[Part, Result]):
    parts: Sequence[Part]
    done: asyncio.Future[list[Result]] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Grouped(Generic[Part, Result]):
    """Sends callers' parts with `send` (one result per part, in order), the
    parts of callers that meet in one call of `send`, one call at a time."""

    def __init__(
        self,
        send: Callable[[list[Part]], Awaitable[list[Result]]],
        *,
        name: str,
        max_parts: int = MAX_PARTS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._send = send
        self._name = name
        self._max = max_parts
        self._max_in_flight = max_in_flight
        self._waiting: list[_Call[Part, Result]] = []
        self._senders: set[asyncio.Task[None]] = set()
        #: Requests sent, and parts in them (what grouping achieved).
        self.requests = 0
        self.parts = 0

    async def submit(self, parts: Sequence[Part]) -> list[Result]:
        """The results of `parts`; sent even if the caller stops waiting."""
        if not parts:
            return []
        call: _Call[Part, Result] = _Call(parts)
        self._waiting.append(call)
        self._start_sender()
        return await asyncio.shield(call.done)

    def _start_sender(self) -> None:
        if self._waiting and len(self._senders) < self._max_in_flight:
            sender = asyncio.get_running_loop().create_task(self._send_waiting(), name=self._name)
            self._senders.add(sender)

    async def _send_waiting(self) -> None:
        """Sends what waits when this task runs (every call made meanwhile)."""
        try:
            batch: list[_Call[Part, Result]] = []
            size = 0
            # At least one call per request, however large.
            while self._waiting and (not batch or size + len(self._waiting[0].parts) <= self._max):
                call = self._waiting.pop(0)
                batch.append(call)
                size += len(call.parts)
            if batch:
                await self._send_batch(batch)
        finally:
            self._senders.discard(asyncio.current_task())
            self._start_sender()

    async def _send_batch(self, batch: Sequence[_Call[Part, Result]]) -> None:
        parts = [part for call in batch for part in call.parts]
        try:
            results = await self._send(parts)
            if len(results) != len(parts):
                raise RuntimeError(f"OpenSearch answered {len(results)} of {len(parts)} parts")
        except Exception as exc:  # every caller of the request fails, none is acknowledged
            error = request_error(exc)
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(error)
            return
        self.requests += 1
        self.parts += len(parts)
        start = 0
        for call in batch:
            if not call.done.done():
                call.done.set_result(results[start : start + len(call.parts)])
            start += len(call.parts)

    async def close(self) -> None:
        """Waits for the calls already handed over."""
        while self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)


def operations(actions: Sequence[Action]) -> list[list[Action]]:
    """A bulk body cut into its operations: a header, then a body unless it is
    a delete. ValueError for a malformed body."""
    out: list[list[Action]] = []
    i = 0
    while i < len(actions):
        header = actions[i]
        if len(header) != 1 or next(iter(header)) not in OPERATIONS:
            raise ValueError(f"bulk action {i} is not an operation header")
        width = 1 if "delete" in header else 2
        if i + width > len(actions):
            raise ValueError("the last bulk operation has no body")
        out.append(list(actions[i : i + width]))
        i += width
    return out


def item_result(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """The result of one bulk item (`{"create": {...}}` → `{...}`)."""
    result: Mapping[str, Any] = next(iter(item.values()))
    return result


class BulkWriter:
    """Writes callers' bulk bodies, concurrent callers' in one `_bulk` request."""

    def __init__(self, client: AsyncOpenSearch, *, max_operations: int = MAX_PARTS) -> None:
        self._client = client
        self.grouped: Grouped[list[Action], Item] = Grouped(
            self._bulk, name="opensearch-bulk", max_parts=max_operations
        )

    async def write(self, actions: Sequence[Action]) -> list[Item]:
        """The result items of `actions` (a bulk body), one per operation, in
        order; ServiceError UNAVAILABLE when the request failed as a whole."""
        return await self.grouped.submit(operations(actions))

    async def _bulk(self, ops: list[list[Action]]) -> list[Item]:
        reply = await self._client.bulk(body=[action for op in ops for action in op])
        items: list[Item] = reply["items"]
        return items


class DocReader:
    """Realtime gets by id, concurrent callers' in one `_mget` request."""

    def __init__(self, client: AsyncOpenSearch, *, max_docs: int = MAX_PARTS) -> None:
        self._client = client
        self.grouped: Grouped[tuple[str, str], Item] = Grouped(
            self._mget, name="opensearch-mget", max_parts=max_docs
        )

    async def get(self, index: str, doc_id: str) -> Item:
        """The document as `GET <index>/_doc/<id>` answers it (`found`, `_source`,
        `_seq_no`, `_primary_term`); a missing index reads as a missing document."""
        [doc] = await self.grouped.submit([(index, doc_id)])
        return doc

    async def get_many(self, index: str, doc_ids: Sequence[str]) -> list[Item]:
        """The documents of `doc_ids`, in order, each as `get` answers it."""
        return await self.grouped.submit([(index, doc_id) for doc_id in doc_ids])

    async def _mget(self, docs: list[tuple[str, str]]) -> list[Item]:
        reply = await self._client.mget(
            body={"docs": [{"_index": index, "_id": doc_id} for index, doc_id in docs]}
        )
        out: list[Item] = reply["docs"]
        return out


def request_error(exc: Exception) -> Exception:
    """What the callers of a failed request see: UNAVAILABLE when the node
    could not be reached or failed (5xx, 429); the error itself otherwise."""
    status = getattr(exc, "status_code", None)
    failing = isinstance(status, int) and (status >= 500 or status == 429)
    if isinstance(exc, NodeUnreachable) or (isinstance(exc, TransportError) and failing):
        log.warning("an OpenSearch request failed", extra={"error": repr(exc)[:500]})
        error = store_unreachable()
        error.__cause__ = exc
        return error
    return exc
