"""gRPC server bootstrap shared by every Marie service.

A service is a `Component`: it opens its resources in `start()`, registers its
servicers, and closes everything in `close()`. `start_server` binds the port,
adds health and reflection, starts the components and only then reports
SERVING. `serve` runs one until SIGTERM/SIGINT, then marks NOT_SERVING, keeps
taking calls for the drain delay (while load balancers notice), lets in-flight
calls finish within the grace period and closes the components.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from marie_kit import tracing
from marie_kit.channels import LIFECYCLE_HEALTH
from marie_kit.interceptors import ServerInterceptor
from marie_kit.metrics import start_metrics_server
from marie_kit.reflection import enable_reflection
from marie_kit.storage import StorageWatch

log = logging.getLogger("marie.server")


class Component(Protocol):
    """What a service hands to the server bootstrap."""

    #: Fully qualified service names, e.g. "marie.auth.v1.AuthService".
    service_names: Sequence[str]
    #: ErrorInfo domain, e.g. "marie.auth".
    domain: str

    # Optional: `interceptors`, a sequence of grpc.aio.ServerInterceptor run
    # inside the kit's own (e.g. marie_kit.tenancy.TenantInterceptor); and
    # `storage`, a marie_kit.storage.StorageWatch of the component's store:
    # a call refused for lack of space reports to it, and the server's
    # health is NOT_SERVING while it is full.

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicers to `server`."""

    async def start(self) -> None:
        """Open stores and clients; raise if the service cannot become ready."""

    async def stopping(self) -> None:
        """Shutdown has begun: end calls that never end on their own (watch
        streams) so the grace period is spent only on real work."""

    async def close(self) -> None:
        """Release everything `start` opened."""


@dataclass
class RunningServer:
    """A started server: its bound port and the handles needed to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    components: Sequence[Component]
    stopping: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """NOT_SERVING first; new calls are still taken for `drain_delay`
        seconds, so that a load balancer that polls health (Envoy: every 5 s)
        stops sending calls before the port closes, rather than having them
        refused; then let in-flight calls finish, then close components."""
        self.stopping = True
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            log.info("draining", extra={"drain_delay_seconds": drain_delay})
            await asyncio.sleep(drain_delay)
        for watch in _watches(self.components):
            await watch.close()
        for component in self.components:
            await component.stopping()
        await self.server.stop(grace)
        for component in reversed(self.components):
            try:
                await component.close()
            except Exception:
                log.exception("error while closing %s", type(component).__name__)


async def start_server(
    components: Sequence[Component],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connection_age: float = 0,
) -> RunningServer:
    """Start `components` behind one gRPC server; returns once SERVING.
    With a `max_connection_age` (seconds), each client connection is sent
    GOAWAY after about that long: calls in flight finish on it, new ones go
    on a new connection, and a client of a DNS name (`dns:///memory:50052`,
    round_robin) resolves it again, so replicas started since get calls."""
    domain = components[0].domain if components else "marie"
    watches = _watches(components)
    server = grpc.aio.server(
        # The kit's own first (outermost), so that errors the components'
        # interceptors raise get its rich status, access log and metrics.
        # With tracing on, the kit's own opens each call's span
        # (marie_kit.tracing.server_span).
        interceptors=[
            ServerInterceptor(domain, watches),
            *(i for c in components for i in getattr(c, "interceptors", ())),
        ],
        options=(
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            # Accept the clients' keepalive pings (channels.CHANNEL_OPTIONS ping
            # every 30 s even when idle) instead of answering GOAWAY too_many_pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
            *_age_options(max_connection_age),
        ),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [n for c in components for n in c.service_names]
    for component in components:
        component.register(server)
    enable_reflection([*names, health.SERVICE_NAME], server)
    # Not serving until every component has opened what it needs.
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names, LIFECYCLE_HEALTH]:
        await health_servicer.set(name, not_serving)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc's way of saying the bind failed
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or not ours") from exc
    await server.start()
    started: list[Component] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
    except BaseException:
        await server.stop(None)
        for component in reversed(started):
            await component.close()
        raise
    # LIFECYCLE_HEALTH (health-checked channels watch it) only now and at
    # shutdown: set_ready below (a full store) leaves it alone.
    for name in ["", *names, LIFECYCLE_HEALTH]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, bound, health_servicer, components)

    async def set_ready(ready: bool) -> None:
        if running.stopping:  # shutdown has said NOT_SERVING for good
            return
        status = health_pb2.HealthCheckResponse.SERVING if ready else not_serving
        for name in ["", *names]:
            await health_servicer.set(name, status)

    for watch in watches:
        watch.bind(set_ready)
    return running


def _age_options(max_connection_age: float) -> list[tuple[str, int]]:
    """gRPC adds ±10 % jitter to the age, so replicas' clients do not all
    reconnect at once. No grace limit: a long stream (a slow model's answer,
    a watch) is never cut by its connection's age."""
    if max_connection_age <= 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(max_connection_age * 1000)))]


def _watches(components: Sequence[Component]) -> list[StorageWatch]:
    return [w for c in components if (w := getattr(c, "storage", None)) is not None]


async def serve(
    components: Sequence[Component],
    *,
    host: str,
    port: int,
    grace: float,
    drain_delay: float = 0.0,
    metrics_port: int = 0,
    max_connection_age: float = 0,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (RunningServer.stop).
    With a `metrics_port`, Prometheus metrics are served there as well."""
    try:
        if metrics_port:
            start_metrics_server(host, metrics_port)
        running = await start_server(
            components, host=host, port=port, max_connection_age=max_connection_age
        )
    except OSError as exc:
        # One clear line, not a traceback: the operator has a port to change.
        log.error("%s", exc)
        raise SystemExit(1) from None
    log.info(
        "serving",
        extra={
            "address": f"{host}:{running.port}",
            "services": [n for c in components for n in c.service_names],
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": grace})
    await running.stop(grace, drain_delay)
    log.info("stopped")
    tracing.shutdown()


def run(main: object) -> None:
    """Run a coroutine on uvloop (the fastest loop available to us)."""
    import uvloop  # noqa: PLC0415 - only the process entry point needs it

    uvloop.run(main)  # type: ignore[arg-type]
