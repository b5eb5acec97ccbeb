"""The floor under Marie's hot path: what one bare grpc.aio call costs.

The gateway reaches providers with one server-streaming call per chat
request. This measures that call with nothing else around it: a grpc.aio
server whose handler yields one small message, a grpc.aio client calling it
in a loop, uvloop on both ends, the server on the gateways' core and the
client on the load core (as `make bench-compare` pins them). It also
measures the unary form, for comparison.

Prints one JSON object: CPU ms per call of the server and the client, and
wall ms per call, for `unary_stream` and `unary_unary`.

With `--legs` it prints instead the two one-way legs of a streaming call
(the request reaching the handler, the first message reaching the caller),
read from one clock (same host), with the handler answering at once and
after a pause as a real model server's (`PAUSE_SECONDS`): what a first
token pays at this hop when both ends have gone idle meanwhile.

Usage: .venv/bin/python bench/grpc_floor.py [--calls 3000] [--legs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, pin

REPLY = b"x" * 300  # about one merged chat chunk
REQUEST = b"m" * 200  # about one short chat request
# A real server's time to its first token (SmolLM2 on this machine class: ~20 ms).
PAUSE_SECONDS = 0.02
PAUSE = b"p"  # the first byte of a request whose handler pauses first
STAMPS = struct.Struct("qq")  # handler entered, first message sent (monotonic ns)
#: Figures by call shape (or leg), by measure.
Results = dict[str, dict[str, float]]


async def _serve() -> None:
    async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
        yield REPLY

    async def unary(request: bytes, context: object) -> bytes:
        return REPLY

    async def stamped(request: bytes, context: object) -> AsyncIterator[bytes]:
        entered = time.monotonic_ns()
        if request.startswith(PAUSE):
            await asyncio.sleep(PAUSE_SECONDS)
        yield STAMPS.pack(entered, time.monotonic_ns()) + REPLY

    handler = grpc.method_handlers_generic_handler(
        "bench.Floor",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stamped": grpc.unary_stream_rpc_method_handler(stamped),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _measure(port: int, server_pid: int, calls: int) -> dict[str, dict[str, float]]:
    results = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/bench.Floor/Stream"
        )
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/bench.Floor/Unary"
        )

        async def streamed() -> None:
            async for _ in stream(REQUEST):
                pass

        async def single() -> None:
            await unary(REQUEST)

        for name, call in (("unary_stream", streamed), ("unary_unary", single)):
            for _ in range(300):  # warm-up
                await call()
            server_before = cpu_seconds(server_pid)
            client_before = time.process_time()
            started = time.perf_counter()
            for _ in range(calls):
                await call()
            results[name] = {
                "server_cpu_ms": (cpu_seconds(server_pid) - server_before) * 1000 / calls,
                "client_cpu_ms": (time.process_time() - client_before) * 1000 / calls,
                "wall_ms": (time.perf_counter() - started) * 1000 / calls,
            }
    return results


async def _legs(port: int, calls: int) -> dict[str, dict[str, float]]:
    """p50 ms of each one-way leg, the handler answering at once and after a
    pause, interleaved."""
    samples: dict[str, tuple[list[float], list[float]]] = {"at_once": ([], []), "paused": ([], [])}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stamped: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/bench.Floor/Stamped"
        )
        for i in range(100 + calls):  # the first 100 warm up
            for name, request in (("at_once", REQUEST), ("paused", PAUSE + REQUEST)):
                started = time.monotonic_ns()
                call = stamped(request)
                first = await call.read()
                arrived = time.monotonic_ns()
                while await call.read() is not grpc.aio.EOF:
                    pass
                assert isinstance(first, bytes)
                entered, sent = STAMPS.unpack_from(first)
                if i >= 100:
                    samples[name][0].append((entered - started) / 1e6)
                    samples[name][1].append((arrived - sent) / 1e6)
    return {
        name: {
            "request_leg_ms": statistics.median(request_leg),
            "reply_leg_ms": statistics.median(reply_leg),
        }
        for name, (request_leg, reply_leg) in samples.items()
    }


def _with_server(
    server_cpus: set[int] | None,
    run: Callable[[int, int], Coroutine[Any, Any, dict[str, dict[str, float]]]],
) -> dict[str, dict[str, float]]:
    """`run(port, server pid)` against the bare server in its own process."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        if server_cpus:
            pin([server.pid], server_cpus)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return uvloop.run(run(port, server.pid))
    finally:
        server.kill()
        server.wait()


def measure(calls: int = 3000, server_cpus: set[int] | None = None) -> dict[str, dict[str, float]]:
    """Start the bare server in its own process and measure both call shapes."""
    return _with_server(server_cpus, lambda port, pid: _measure(port, pid, calls))


def legs(calls: int = 300, server_cpus: set[int] | None = None) -> dict[str, dict[str, float]]:
    """The one-way legs of a streaming call, answered at once and after a pause."""
    return _with_server(server_cpus, lambda port, _pid: _legs(port, calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument(
        "--legs", action="store_true", help="the one-way legs, answered at once and after a pause"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve())
        return
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]} if len(cpus) > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, {cpus[1]})
    if args.legs:
        print(json.dumps(legs(min(args.calls, 1000), server_cpus)))
        return
    print(json.dumps(measure(args.calls, server_cpus)))


if __name__ == "__main__":
    main()
