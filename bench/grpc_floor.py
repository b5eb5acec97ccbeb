"""The floor under Marie's hot path: what one bare grpc.aio call costs.

The gateway reaches providers with one server-streaming call per chat
request. This measures that call with nothing else around it: a grpc.aio
server whose handler yields one small message, a grpc.aio client calling it
in a loop, uvloop on both ends, the server on the gateways' core and the
client on the load core (as `make bench-compare` pins them). It also
measures the unary form, for comparison.

Prints one JSON object: CPU ms per call of the server and the client, and
wall ms per call, for `unary_stream` and `unary_unary`.

Usage: .venv/bin/python bench/grpc_floor.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, pin

REPLY = b"x" * 300  # about one merged chat chunk
REQUEST = b"m" * 200  # about one short chat request


async def _serve() -> None:
    async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
        yield REPLY

    async def unary(request: bytes, context: object) -> bytes:
        return REPLY

    handler = grpc.method_handlers_generic_handler(
        "bench.Floor",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
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


def measure(calls: int = 3000, server_cpus: set[int] | None = None) -> dict[str, dict[str, float]]:
    """Start the bare server in its own process and measure both call shapes."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        if server_cpus:
            pin([server.pid], server_cpus)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return uvloop.run(_measure(port, server.pid, calls))
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve())
        return
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]} if len(cpus) > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, {cpus[1]})
    print(json.dumps(measure(args.calls, server_cpus)))


if __name__ == "__main__":
    main()
