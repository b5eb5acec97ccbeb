"""Incremental NDJSON parsing of byte streams cut at arbitrary points."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from marie_providers.errors import UpstreamProtocolError
from marie_providers.upstream.ndjson import iter_ndjson


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def parse(*parts: bytes, max_line_bytes: int = 1024) -> list[dict[str, Any]]:
    return [line async for line in iter_ndjson(chunks(*parts), max_line_bytes)]


async def test_lines_split_across_chunks_are_reassembled() -> None:
    assert await parse(b'{"a":', b' 1}\n{"b"', b":2}\n") == [{"a": 1}, {"b": 2}]


async def test_several_lines_in_one_chunk_are_all_parsed() -> None:
    assert await parse(b'{"a":1}\n{"a":2}\n{"a":3}\n') == [{"a": 1}, {"a": 2}, {"a": 3}]


async def test_a_last_line_without_newline_is_parsed() -> None:
    assert await parse(b'{"a":1}\n{"a":2}') == [{"a": 1}, {"a": 2}]


async def test_blank_lines_and_crlf_are_skipped() -> None:
    assert await parse(b'\n{"a":1}\r\n\r\n{"a":2}\n') == [{"a": 1}, {"a": 2}]


async def test_a_line_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        await parse(b"<html>bad gateway</html>\n")


async def test_a_line_that_is_not_an_object_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        await parse(b"[1, 2]\n")


async def test_a_line_longer_than_the_limit_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        await parse(b'{"a": "' + b"x" * 600, b"x" * 600)
