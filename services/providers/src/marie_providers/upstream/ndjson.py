"""Newline-delimited JSON read incrementally from a byte stream (Ollama's streaming format)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson

from marie_providers.errors import UpstreamProtocolError

# One line is one small object; a line this long means the upstream is broken,
# and buffering it without bound would let it exhaust our memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


async def iter_ndjson(
    chunks: AsyncIterable[bytes], max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield each line of `chunks` parsed as a JSON object; blank lines are skipped.

    Raises `UpstreamProtocolError` for a line that is not a JSON object or is too long.
    """
    async for batch in iter_ndjson_batches(chunks, max_line_bytes):
        for line in batch:
            yield line


async def iter_ndjson_batches(
    chunks: AsyncIterable[bytes], max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Like `iter_ndjson`, but yields together the lines completed by one read.

    Lines that arrived together can be sent on together, which is what lets a
    busy stream coalesce instead of paying per-line costs downstream. A line
    that is bad ends the stream after the good lines before it.
    """
    buffer = bytearray()
    async for chunk in chunks:
        # Search only the new bytes: a line split over many chunks stays linear.
        start = len(buffer)
        buffer += chunk
        newline = buffer.find(b"\n", start)
        line_start = 0
        batch: list[dict[str, Any]] = []
        try:
            while newline >= 0:
                line = buffer[line_start:newline]
                line_start = newline + 1
                if line.strip():
                    batch.append(_parse(line))
                newline = buffer.find(b"\n", line_start)
        except UpstreamProtocolError:
            if batch:
                yield batch
            raise
        del buffer[:line_start]
        if batch:
            yield batch
        if len(buffer) > max_line_bytes:
            raise UpstreamProtocolError(f"NDJSON line longer than {max_line_bytes} bytes")
    if buffer.strip():
        yield [_parse(buffer)]


def _parse(line: bytes | bytearray) -> dict[str, Any]:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"invalid JSON line: {exc}") from exc
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"expected a JSON object per line, got {type(value).__name__}")
    return value
