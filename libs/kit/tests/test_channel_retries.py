"""The kit's channels retry an idempotent call that failed UNAVAILABLE once,
on the next replica: two real gRPC servers behind one target, one of them
dying (it answers every call UNAVAILABLE, as a replica shutting down does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from marie_kit.channels import insecure_channel

MEMORY = "marie.memory.v1.MemoryService"
CALLS = 20


@dataclass
class Replica:
    dying: bool
    port: int = 0
    calls: list[str] = field(default_factory=list)
    server: grpc.aio.Server | None = None

    def handler(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.calls.append(method)
            if self.dying:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            return b"ok"

        return grpc.unary_unary_rpc_method_handler(answer, lambda b: b, lambda b: b)


async def _serve(replica: Replica) -> None:
    methods = ("GetMemory", "DeleteMemory", "AppendMessages")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(MEMORY, {m: replica.handler(m) for m in methods}),)
    )
    replica.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    replica.server = server


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Replica, Replica]]:
    dying, healthy = Replica(dying=True), Replica(dying=False)
    for r in (dying, healthy):
        await _serve(r)
    yield dying, healthy
    for r in (dying, healthy):
        assert r.server is not None
        await r.server.stop(0)


async def _connected(channel: grpc.aio.Channel, replicas: tuple[Replica, Replica]) -> None:
    """Until round_robin has both replicas connected (a retry made while only
    one is connected goes to that one again); then counts from zero."""
    for _ in range(200):
        if all(r.calls for r in replicas):
            break
        await _outcomes(channel, "DeleteMemory", 1)
    assert all(r.calls for r in replicas)
    for r in replicas:
        r.calls.clear()


async def _outcomes(channel: grpc.aio.Channel, method: str, calls: int = CALLS) -> list[str]:
    call = channel.unary_unary(f"/{MEMORY}/{method}", lambda b: b, lambda b: b)
    out = []
    for _ in range(calls):
        try:
            await call(b"", timeout=5)
            out.append("OK")
        except grpc.aio.AioRpcError as exc:
            out.append(exc.code().name)
    return out


async def test_an_idempotent_call_is_retried_once_on_the_other_replica(
    replicas: tuple[Replica, Replica],
) -> None:
    dying, healthy = replicas
    target = f"ipv4:127.0.0.1:{dying.port},127.0.0.1:{healthy.port}"
    async with insecure_channel(target) as channel:
        await _connected(channel, replicas)
        assert await _outcomes(channel, "GetMemory") == ["OK"] * CALLS
        # Both replicas were tried: the dying one's calls were made again.
        assert dying.calls.count("GetMemory") >= 1
        assert healthy.calls.count("GetMemory") == CALLS

        # A write without a request id is not: some calls fail.
        deletes = await _outcomes(channel, "DeleteMemory")
        assert "UNAVAILABLE" in deletes and "OK" in deletes
        assert dying.calls.count("DeleteMemory") == deletes.count("UNAVAILABLE")
        appends = await _outcomes(channel, "AppendMessages")
        assert "UNAVAILABLE" in appends


async def test_keyed_writes_are_retried_only_on_a_channel_that_says_it_keys_them(
    replicas: tuple[Replica, Replica],
) -> None:
    dying, healthy = replicas
    target = f"ipv4:127.0.0.1:{dying.port},127.0.0.1:{healthy.port}"
    async with insecure_channel(target, keyed_writes=True) as channel:
        await _connected(channel, replicas)
        assert await _outcomes(channel, "AppendMessages") == ["OK"] * CALLS
        assert "UNAVAILABLE" in await _outcomes(channel, "DeleteMemory")
    assert healthy.calls.count("AppendMessages") == CALLS
    assert dying.calls.count("AppendMessages") >= 1
