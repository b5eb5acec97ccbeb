"""Server-sent events read incrementally from a byte stream (OpenAI's and Anthropic's streaming).

Only what the upstreams use: `event:` and `data:` fields (several `data:` lines
join with a newline), comments (`: keep-alive`) skipped, events ended by a
blank line, any of the three line endings.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass

from marie_providers.errors import UpstreamProtocolError

# One event is one small JSON object; an event this long means a broken
# upstream, and buffering it without bound would let it exhaust our memory.
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: its type ("message" when unnamed) and its data."""

    event: str
    data: str


class _Decoder:
    """Accumulates lines into events; feed it one line (without its ending) at a time."""

    __slots__ = ("_data", "_event", "_size")

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._size = 0

    def line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if raw.startswith(b":"):
            return None
        text = raw.decode("utf-8", "replace")
        field, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._size += len(value)
            if self._size > MAX_EVENT_BYTES:
                raise UpstreamProtocolError(
                    f"server-sent event longer than {MAX_EVENT_BYTES} bytes"
                )
        elif field == "event":
            self._event = value
        # "id" and "retry" mean nothing to a one-shot response; unknown fields are ignored.
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        event = Event(self._event or "message", "\n".join(self._data))
        self._event, self._data, self._size = "", [], 0
        return event

    def end(self) -> Event | None:
        return self._dispatch()


async def iter_sse_batches(
    chunks: AsyncIterable[bytes], max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncGenerator[list[Event], None]:
    """The events of an SSE body, those completed by one read yielded together.

    Events that arrived together can go on together, so a busy stream coalesces
    instead of paying per-event costs downstream (as `iter_ndjson_batches`).
    """
    decoder = _Decoder()
    buffer = bytearray()
    pending_cr = False
    async for received in chunks:
        chunk = received
        if pending_cr and chunk.startswith(b"\n"):
            # "\r\n" split across two reads: the "\r" already ended the line.
            chunk = chunk[1:]
        pending_cr = False
        start = len(buffer)
        buffer += chunk
        batch: list[Event] = []
        line_start = 0
        position = start
        while True:
            end = _line_end(buffer, position)
            if end < 0:
                break
            line = bytes(buffer[line_start:end])
            if buffer[end] == 0x0D:
                if end + 1 < len(buffer):
                    line_start = end + 2 if buffer[end + 1] == 0x0A else end + 1
                else:
                    line_start = end + 1
                    pending_cr = True
            else:
                line_start = end + 1
            position = line_start
            if (event := decoder.line(line)) is not None:
                batch.append(event)
        del buffer[:line_start]
        if batch:
            yield batch
        if len(buffer) > max_event_bytes:
            raise UpstreamProtocolError(
                f"server-sent event line longer than {max_event_bytes} bytes"
            )
    if buffer:
        decoder.line(bytes(buffer))
    if (event := decoder.end()) is not None:
        yield [event]


def _line_end(buffer: bytearray, start: int) -> int:
    """Index of the first "\\r" or "\\n" at or after `start`; -1 when there is none."""
    newline = buffer.find(b"\n", start)
    carriage = buffer.find(b"\r", start)
    if carriage < 0:
        return newline
    if newline < 0:
        return carriage
    return min(newline, carriage)
