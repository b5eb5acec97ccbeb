"""Provider health, probed in the background and served from memory.

A health call never waits on an upstream: it reads the last probe of each
provider (and the live routing state of its deployments). Probes run every
`interval` seconds, each provider on its own, so one slow upstream delays only
its own entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.routing.metrics import HEALTHY
from marie_providers.routing.registry import ModelRegistry
from marie_providers.routing.router import Router
from marie_providers.upstream.provider import Provider

log = logging.getLogger("marie.providers.health")

# Users refused by an open circuit ask for a probe of its provider at most this often.
SOON_GAP_SECONDS = 1.0


def _refusing(deployment: pb.DeploymentHealth) -> str:
    operation = pb.Operation.Name(deployment.operation).removeprefix("OPERATION_").lower()
    what = f"{deployment.model} ({operation})"
    failures = deployment.consecutive_failures
    if deployment.circuit == pb.CIRCUIT_STATE_OPEN:
        until = deployment.retry_time.ToDatetime().strftime("%H:%M:%S UTC")
        return f"{what} circuit open after {failures} failures in a row, until {until}"
    return f"{what} circuit half-open after {failures} failures in a row: a request probes it"


class HealthMonitor:
    """The last health of every provider, kept fresh by a background task."""

    def __init__(self, registry: ModelRegistry, router: Router, *, interval: float) -> None:
        self._registry = registry
        self._router = router
        self._interval = interval
        self._latest: dict[str, pb.ProviderHealth] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._sent: dict[str, float] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        router.on_refused = self.probe_soon

    def probe_soon(self, name: str) -> None:
        """Probe `name` now, unless a probe of it is running or began less than
        `SOON_GAP_SECONDS` ago: users refused by its open circuit are waiting."""
        running = self._probes.get(name)
        if self._closed or (running is not None and not running.done()):
            return
        if self._router.now() - self._sent.get(name, -math.inf) < SOON_GAP_SECONDS:
            return
        provider = next((p for p in self._registry.providers if p.name == name), None)
        if provider is not None:
            self._probes[name] = asyncio.ensure_future(self._probe(provider))

    async def _probe(self, provider: Provider) -> None:
        sent = self._sent[provider.name] = self._router.now()
        try:
            [health] = await self._registry.health(provider.name)
        except Exception:
            log.exception("health probe of %s failed", provider.name)
            return
        healthy = health.status == pb.HEALTH_STATUS_HEALTHY
        HEALTHY.labels(provider.name).set(1.0 if healthy else 0.0)
        if healthy:
            self._router.vouch(provider.name, sent)
        previous = self._latest.get(provider.name)
        self._latest[provider.name] = health
        if previous is None or previous.status != health.status:
            # Changes only: a provider down for hours is one line, not one per probe.
            log.log(
                logging.INFO if health.available else logging.WARNING,
                "provider health changed",
                extra={
                    "provider": provider.name,
                    "url": provider.base_url,
                    "status": pb.HealthStatus.Name(health.status),
                    "error": health.error,
                },
            )

    def _start_round(self) -> list[asyncio.Task[None]]:
        """Probe every provider whose previous probe has finished."""
        started = []
        for provider in self._registry.providers:
            running = self._probes.get(provider.name)
            if running is not None and not running.done():
                continue
            task = asyncio.ensure_future(self._probe(provider))
            self._probes[provider.name] = task
            started.append(task)
        return started

    async def start(self, first_round_timeout: float) -> None:
        """Run a first round (waiting at most `first_round_timeout`), then keep probing."""
        started = self._start_round()
        if started:
            await asyncio.wait(started, timeout=first_round_timeout)
        self._loop_task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._start_round()

    def snapshot(self, provider: str = "") -> list[pb.ProviderHealth]:
        """The selected providers' last health, with their deployments' routing state.

        NOT_FOUND (PROVIDER_NOT_FOUND) for an unknown provider, as before.
        """
        out = []
        for owner in self._registry.select(provider):
            health = pb.ProviderHealth()
            latest = self._latest.get(owner.name)
            if latest is None:
                health.provider = owner.name
                health.status = pb.HEALTH_STATUS_UNHEALTHY
                health.error = "not probed yet"
                health.supports_streaming = owner.supports_streaming
                health.supports_embeddings = owner.supports_embeddings
                health.default_model = owner.default_model
            else:
                health.CopyFrom(latest)
            health.deployments.extend(self._router.deployment_health(owner.name))
            refusing = [d for d in health.deployments if d.circuit != pb.CIRCUIT_STATE_CLOSED]
            if refusing and health.status == pb.HEALTH_STATUS_HEALTHY:
                # It answers its probe, yet requests to it are being refused: say so.
                health.status = pb.HEALTH_STATUS_DEGRADED
                health.error = "; ".join(_refusing(d) for d in refusing)
            out.append(health)
        return out

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._probes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
