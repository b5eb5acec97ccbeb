"""FastTransport and UpstreamClient against real sockets.

Each test runs a small asyncio TCP server on an ephemeral port that reads
real HTTP/1.1 requests and answers with exactly the bytes under test
(well-formed or broken), and counts connections, so pooling, framing,
timeouts and errors are checked on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from marie_providers.upstream.transport import FastTransport, UpstreamClient

# (request head, request body, writer) -> whether to keep the connection open.
Answer = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]


class RawServer:
    """HTTP/1.1 requests in, scripted bytes out; records what it saw."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                body = await _read_body(reader, head)
                self.requests.append((head, body))
                if not await self.answer(head, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # the client went away, or the test ended
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lines = head.lower().split(b"\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0
    )
    if b"transfer-encoding: chunked" in lines:
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    return await reader.readexactly(length) if length else b""


def reply(body: bytes, *, status: str = "200 OK", extra: bytes = b"") -> Answer:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 "
            + status.encode()
            + b"\r\ncontent-length: %d\r\n" % len(body)
            + extra
            + b"\r\n"
            + body
        )
        await writer.drain()
        return True

    return answer


@pytest.fixture
async def transport() -> AsyncIterator[FastTransport]:
    fast = FastTransport()
    yield fast
    await fast.aclose()


async def get(
    transport: FastTransport,
    url: str,
    *,
    method: str = "GET",
    timeout: httpx.Timeout | float = 5,
    content: bytes | AsyncIterator[bytes] | None = None,
) -> httpx.Response:
    """One request through `transport` (which outlives the client)."""
    client = httpx.AsyncClient(transport=transport, timeout=timeout)
    return await client.request(method, url, content=content)


async def test_keep_alive_reuses_one_connection(transport: FastTransport) -> None:
    async with RawServer(reply(b'{"ok":true}')) as server:
        client = httpx.AsyncClient(transport=transport, base_url=server.url)
        for n in range(5):
            response = await client.post("/api/chat", content=b'{"n":%d}' % n)
            assert response.status_code == 200
            assert response.json() == {"ok": True}
        assert server.connections == 1
        assert [body for _, body in server.requests] == [b'{"n":%d}' % n for n in range(5)]
        head = server.requests[0][0].decode()
        assert head.startswith("POST /api/chat HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{server.port}" in head.lower()


async def test_chunked_body_streams_as_it_arrives(transport: FastTransport) -> None:
    release = asyncio.Event()

    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with RawServer(answer) as server:
        client = httpx.AsyncClient(transport=transport)
        async with client.stream("GET", server.url) as response:
            pieces = response.aiter_bytes()
            assert await anext(pieces) == b"first"  # before the rest was even sent
            release.set()
            assert [piece async for piece in pieces] == [b"second"]
        # Read to its end: the connection went back to the pool.
        assert (await client.get(server.url)).status_code == 200
        assert server.connections == 1


async def test_body_until_close_and_no_reuse(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await writer.drain()
        return False  # the end of the connection ends the body

    async with RawServer(answer) as server:
        assert (await get(transport, server.url)).text == "all of it"
        assert (await get(transport, server.url)).text == "all of it"
        assert server.connections == 2


async def test_idle_connection_closed_by_upstream_is_retried_once(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        return False  # closes the connection it just advertised as keep-alive

    async with RawServer(answer) as server:
        client = httpx.AsyncClient(transport=transport)
        assert (await client.post(server.url, content=b"one")).text == "ok"
        await asyncio.sleep(0.05)  # the close reaches the pooled connection
        assert (await client.post(server.url, content=b"two")).text == "ok"
        assert [body for _, body in server.requests] == [b"one", b"two"]
        assert server.connections == 2


async def test_connection_refused_is_connect_error(transport: FastTransport) -> None:
    async with RawServer(reply(b"")) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await get(transport, url)


async def test_silent_upstream_is_read_timeout(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with RawServer(answer) as server:
        with pytest.raises(httpx.ReadTimeout):
            await get(transport, server.url, timeout=httpx.Timeout(5, read=0.2))


async def test_malformed_answer_is_protocol_error(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        return True

    async with RawServer(answer) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await get(transport, server.url)


async def test_cut_body_is_read_error(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        return False

    async with RawServer(answer) as server:
        with pytest.raises(httpx.ReadError):
            await get(transport, server.url)


async def test_abandoned_stream_closes_its_connection(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        return True  # never finishes; the server reads on and sees the client close

    async with RawServer(answer) as server:
        client = httpx.AsyncClient(transport=transport)
        async with client.stream("GET", server.url) as response:
            async for _ in response.aiter_bytes():
                break
        await asyncio.sleep(0.1)
        assert server.closed_by_client == 1
        assert transport._idle_count == 0


async def test_streamed_request_body_is_sent_chunked(transport: FastTransport) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"alpha ", b"", b"beta"):
            yield part

    async with RawServer(reply(b"thanks")) as server:
        response = await get(transport, server.url, method="POST", content=parts())
        assert response.text == "thanks"
        head, body = server.requests[0]
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"alpha beta"


async def test_interim_answer_then_real_one(transport: FastTransport) -> None:
    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nx-real: yes\r\n\r\ndone")
        await writer.drain()
        return True

    async with RawServer(answer) as server:
        response = await get(transport, server.url)
        assert (response.status_code, response.text) == (201, "done")
        assert response.headers["x-real"] == "yes"
        assert "link" not in response.headers


async def test_gzip_body_is_decoded_by_httpx(transport: FastTransport) -> None:
    async with RawServer(
        reply(gzip.compress(b"squeezed"), extra=b"content-encoding: gzip\r\n")
    ) as server:
        assert (await get(transport, server.url)).text == "squeezed"


async def test_pool_limit_waits_then_times_out() -> None:
    fast = FastTransport(max_connections=1)
    gate = asyncio.Event()

    async def answer(head: bytes, _: bytes, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        return False

    async with RawServer(answer) as server:
        client = httpx.AsyncClient(transport=fast, timeout=httpx.Timeout(5, pool=0.2))
        first = asyncio.create_task(client.get(server.url))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(server.url)
        waiting = asyncio.create_task(client.get(server.url))
        await asyncio.sleep(0.05)
        gate.set()  # the first answer ends and its connection closes: the waiter goes on
        assert (await first).status_code == 200
        assert (await waiting).status_code == 200
    await fast.aclose()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_upstream(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = FastTransport(verify=ssl.create_default_context(cafile=str(cert)))
        assert (await get(trusting, f"https://127.0.0.1:{port}/")).text == "secure"
        await trusting.aclose()
        default = FastTransport()  # certifi's roots do not know this certificate
        with pytest.raises(httpx.ConnectError):
            await get(default, f"https://127.0.0.1:{port}/")
        await default.aclose()
    finally:
        server.close()


async def test_upstream_client_direct_stream_merges_headers_and_base_url() -> None:
    async with RawServer(reply(b'{"a":1}\n{"b":2}\n')) as server:
        upstream = UpstreamClient(
            server.url + "/v1/",
            headers={"authorization": "Bearer sekrit"},
            connect_timeout=5,
            read_timeout=5,
            max_connections=4,
            max_keepalive_connections=4,
        )
        async with upstream.stream(
            "chat/completions", b"{}", {"content-type": "application/json"}
        ) as response:
            assert response.status_code == 200
            assert (
                b"".join([piece async for piece in response.aiter_bytes()]) == b'{"a":1}\n{"b":2}\n'
            )
        head = server.requests[0][0].decode().lower()
        assert head.startswith("post /v1/chat/completions http/1.1")
        assert "authorization: bearer sekrit" in head
        assert "content-type: application/json" in head
        assert "user-agent: python-httpx" in head
        await upstream.aclose()


async def test_upstream_client_goes_through_a_configured_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with RawServer(reply(b"from the proxy")) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        upstream = UpstreamClient(
            "http://upstream.example:8080",
            headers={},
            connect_timeout=5,
            read_timeout=5,
            max_connections=4,
            max_keepalive_connections=4,
        )
        async with upstream.stream("api/chat", b"{}", {}) as response:
            assert await response.aread() == b"from the proxy"
        # An HTTP proxy gets the absolute URL in the request line.
        assert proxy.requests[0][0].startswith(b"POST http://upstream.example:8080/api/chat ")
        await upstream.aclose()


@pytest.mark.parametrize(
    ("status", "with_output", "told"),
    [(200, False, True), (200, True, False), (400, False, False)],
    ids=["head-first", "output-with-the-head", "refused"],
)
async def test_a_stream_is_accepted_at_its_head_unless_its_output_came_with_it(
    status: int, with_output: bool, told: bool
) -> None:
    # Acceptance lets providers' caller start its answer while the model
    # works; an upstream whose first output came with its head gains nothing
    # from it, and a refusal is no acceptance.
    release = asyncio.Event()
    head = b"HTTP/1.1 %d X\r\ntransfer-encoding: chunked\r\n\r\n" % status
    first = b"5\r\nfirst\r\n"

    async def answer(_: bytes, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(head + first if with_output else head)
        await writer.drain()
        await release.wait()
        writer.write(b"" if with_output else first)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    accepted: list[bool] = []

    async def accept() -> None:
        accepted.append(True)

    async with RawServer(answer) as server:
        upstream = UpstreamClient(
            server.url + "/",
            headers={},
            connect_timeout=5,
            read_timeout=5,
            max_connections=4,
            max_keepalive_connections=4,
        )
        async with upstream.stream("chat", b"{}", {}, accepted=accept) as response:
            said = bool(accepted)  # before the rest of the answer was even sent
            release.set()
            assert b"".join([piece async for piece in response.aiter_bytes()]) == b"first"
        await upstream.aclose()

    assert said is told
    assert accepted == ([True] if told else [])
