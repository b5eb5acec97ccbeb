"""A health-checked kit channel sends calls only to replicas whose gRPC
health service says SERVING (client-side health checking): a replica that is
starting (its port open, its stores not yet) or stopping (NOT_SERVING,
draining) gets no new calls from round_robin, as Envoy's health checks keep
them off it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from marie_kit.channels import LIFECYCLE_HEALTH, insecure_channel
from marie_kit.server import start_server

MEMORY = "marie.memory.v1.MemoryService"
CALLS = 20


@dataclass
class Replica:
    port: int = 0
    calls: int = 0
    server: grpc.aio.Server | None = None
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)

    async def serving(self, serving: bool) -> None:
        statuses = health_pb2.HealthCheckResponse
        await self.health.set(
            LIFECYCLE_HEALTH, statuses.SERVING if serving else statuses.NOT_SERVING
        )


async def _serve(replica: Replica) -> None:
    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        replica.calls += 1
        return b"ok"

    handler = grpc.unary_unary_rpc_method_handler(answer, lambda b: b, lambda b: b)
    server = grpc.aio.server()
    methods = grpc.method_handlers_generic_handler(MEMORY, {"GetMemory": handler})
    server.add_generic_rpc_handlers((methods,))
    health_pb2_grpc.add_HealthServicer_to_server(replica.health, server)
    replica.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    replica.server = server


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Replica, Replica]]:
    pair = (Replica(), Replica())
    for replica in pair:
        await _serve(replica)
        await replica.serving(True)
    yield pair
    for replica in pair:
        assert replica.server is not None
        await replica.server.stop(0)


async def _call(channel: grpc.aio.Channel, calls: int = CALLS) -> None:
    call = channel.unary_unary(f"/{MEMORY}/GetMemory", lambda b: b, lambda b: b)
    for _ in range(calls):
        await call(b"", timeout=5, wait_for_ready=True)


async def test_a_replica_not_serving_gets_no_calls_and_gets_them_back_when_serving(
    replicas: tuple[Replica, Replica],
) -> None:
    stopping, other = replicas
    target = f"ipv4:127.0.0.1:{stopping.port},127.0.0.1:{other.port}"
    async with insecure_channel(target, health_checked=True) as channel:
        await _call(channel)
        assert stopping.calls > 0 and other.calls > 0  # round_robin over both

        await stopping.serving(False)
        # The health watch reaches the channel as a stream message: wait until
        # the channel has moved off the replica (a call or two may still go).
        for _ in range(100):
            before = stopping.calls
            await _call(channel, 4)
            if stopping.calls == before:
                break
        stopping.calls = other.calls = 0
        await _call(channel)
        assert stopping.calls == 0
        assert other.calls == CALLS

        await stopping.serving(True)
        for _ in range(100):
            await _call(channel, 1)
            if stopping.calls:
                break
        assert stopping.calls > 0


async def test_a_kit_server_answers_the_health_watch_that_channels_use() -> None:
    """Client-side health checking calls Health/Watch; the kit's server
    interceptor once failed it INTERNAL, which kept a health-checked channel
    from ever using the server."""
    running = await start_server([])
    try:
        async with insecure_channel(running.target, health_checked=True) as channel:
            # The published stubs declare no methods on HealthStub.
            stub: Any = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIFECYCLE_HEALTH), timeout=5)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            # A full store turns the server NOT_SERVING overall, not for the
            # channels: a call still reaches it (its answer, UNIMPLEMENTED,
            # is the server's: the channel is usable).
            await running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            call = channel.unary_unary("/none.Service/Method", lambda b: b, lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(b"", timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop(0)
