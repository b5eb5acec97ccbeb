"""Long-lived gRPC client channels and readiness waits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from marie_kit import tracing

# Keepalive lets a channel notice a dead peer (and a restarted one) quickly;
# message limits allow large embedding batches.
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # With a "dns:///service:port" target that resolves to several replicas,
    # spread calls over all of them instead of pinning one.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A channel meant to live as long as the process and be shared by every call.
    With tracing on, each call gets a client span and carries its context."""
    return grpc.aio.insecure_channel(
        target, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors() or None
    )


async def is_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """True when the peer's health service says SERVING for `service`."""
    # The published stubs declare no methods on HealthStub.
    stub: Any = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_until_serving(target: str, service: str = "", timeout: float = 30.0) -> None:
    """Poll the health service of `target` until SERVING; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    async with insecure_channel(target) as channel:
        while True:
            if await is_serving(channel, service, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.05)
