"""Long-lived gRPC client channels and readiness waits."""

from __future__ import annotations

import asyncio
import json
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


#: The health name a health-checked channel watches. Servers made with
#: marie_kit.server say NOT_SERVING for it only while starting and stopping,
#: not while a full store turns them NOT_SERVING overall: reads still work
#: then, and a lone replica must keep getting them, as Envoy's panic routing
#: keeps sending to hosts that all fail their checks.
LIFECYCLE_HEALTH = "marie.kit.Lifecycle"

#: Calls that may run twice with the same effect: a call of these that fails
#: UNAVAILABLE (its replica is dying: GOAWAY, reset, refused connection, or
#: readiness gone) is made once more, on another replica when the target has
#: several (round_robin moves on). Reads and embeddings; never a chat, which
#: the dying replica may have run upstream already (it is not run twice).
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "marie.providers.v1.ProviderService": (
        "ListProviders",
        "GetProviderHealth",
        "ListModels",
        "GetModel",
        "SearchModels",
        "CreateEmbeddings",
    ),
    "marie.auth.v1.AuthService": ("GetApiKey", "ListApiKeys", "ValidateApiKey", "QueryUsage"),
    "marie.memory.v1.MemoryService": (
        "GetConversation",
        "ListConversations",
        "ListMessages",
        "SearchMessages",
        "SearchMemories",
        "GetMemory",
        "ListMemories",
        "GetMemoryHistory",
        "GetExtractionJob",
    ),
}
#: Writes that are idempotent only with a `request_id`: retried only on a
#: channel whose caller sets one on every such call (`keyed_writes=True`).
KEYED_WRITES: dict[str, tuple[str, ...]] = {
    "marie.memory.v1.MemoryService": ("CreateConversation", "AppendMessages", "AddMemories"),
}
RETRY_POLICY = {
    "maxAttempts": 2,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
#: A retry costs a token, a success gives a tenth back: when more than half of
#: 100 are spent (a whole service is down, not one replica) retries stop.
RETRY_THROTTLING = {"maxTokens": 100, "tokenRatio": 0.1}


def service_config(*, keyed_writes: bool = False, health_checked: bool = False) -> str:
    """The channel's service config (JSON): the retry policy of the methods
    above and, when `health_checked`, client-side health checking."""
    methods = {s: list(m) for s, m in IDEMPOTENT_METHODS.items()}
    if keyed_writes:
        for service, names in KEYED_WRITES.items():
            methods.setdefault(service, []).extend(names)
    listed = [{"service": s, "method": m} for s, ms in methods.items() for m in ms]
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": listed, "retryPolicy": RETRY_POLICY}],
        "retryThrottling": RETRY_THROTTLING,
    }
    if health_checked:
        config["healthCheckConfig"] = {"serviceName": LIFECYCLE_HEALTH}
    return json.dumps(config)


def insecure_channel(
    target: str, *, keyed_writes: bool = False, health_checked: bool = False
) -> grpc.aio.Channel:
    """A channel meant to live as long as the process and be shared by every call.

    `keyed_writes`: the caller sets `request_id` on every memory write that
    takes one, so those are retried as well. `health_checked`: the target's
    addresses are the service's own replicas (not a proxy such as Envoy's
    providers_mesh), servers made with marie_kit.server: round_robin then
    picks only replicas whose grpc.health.v1 Watch of LIFECYCLE_HEALTH says
    SERVING, so one that is starting (port open, stores not yet) or stopping
    (draining) gets no new calls, as Envoy's health checks keep it off too; a
    server without the health service counts as healthy, one that does not
    know the name (an older Marie) as not serving: upgrade the servers first.
    Not through a proxy: the Watch would follow one replica behind it, and
    that replica's loss would mark the proxy itself unhealthy for a moment.
    With tracing on, each call gets a client span and carries its context."""
    config = service_config(keyed_writes=keyed_writes, health_checked=health_checked)
    options = (*CHANNEL_OPTIONS, ("grpc.service_config", config))
    return tracing.traced_channel(grpc.aio.insecure_channel(target, options=options))


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
