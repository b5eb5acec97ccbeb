"""The routing's Prometheus metrics: each circuit breaker's state (read when
scraped, never kept up to date on the request path), the calls refused
without asking an upstream, by lane, and each provider's last probed health.

Labels are provider, model id (only models a provider lists or the
configuration names ever get a breaker), operation, reason and lane.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from enum import Enum

from marie_kit.metrics import Children
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: (provider, model id, operation, state) of every breaker of one router.
StateSource = Callable[[], Iterable[tuple[str, str, str, Enum]]]
# The gauge's value for each state, as the help text says.
STATE_VALUES = {"closed": 0.0, "open": 1.0, "half_open": 2.0}

REFUSED = Counter(
    "marie_providers_refused",
    "Calls refused before any upstream was asked (CIRCUIT_OPEN, DEPLOYMENT_BUSY),"
    " by lane: 'user' or 'background' (Marie's own memory work).",
    ["provider", "operation", "reason", "lane"],
)
_refused = Children(REFUSED)

HEALTHY = Gauge(
    "marie_providers_healthy",
    "1 when the provider's last health probe found it healthy, else 0"
    " (unreachable, an error, or no key).",
    ["provider"],
)


def refused(provider: str, operation: str, reason: str, background: bool) -> None:
    _refused(provider, operation, reason, "background" if background else "user").inc()


class _CircuitCollector(Collector):
    """`marie_providers_circuit_state` of every live router's breakers."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[_Source] = weakref.WeakSet()

    def add(self, source: _Source) -> None:
        self._sources.add(source)

    def discard(self, source: _Source) -> None:
        self._sources.discard(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "marie_providers_circuit_state",
            "Circuit breaker of each model and operation: 0 closed, 1 open, 2 half-open"
            " (one user's request probes it; background calls wait).",
            labels=["provider", "model", "operation"],
        )
        for source in list(self._sources):
            for provider, model, operation, state in source.states():
                gauge.add_metric([provider, model, operation], STATE_VALUES[str(state.value)])
        yield gauge


class _Source:
    """A router's breaker states, held weakly by the collector (tests start many)."""

    def __init__(self, states: StateSource) -> None:
        self.states = states

    def close(self) -> None:
        """Stop reporting these states (the service stopped)."""
        _COLLECTOR.discard(self)


_COLLECTOR = _CircuitCollector()
REGISTRY.register(_COLLECTOR)


def watch_circuits(states: StateSource) -> _Source:
    """Report `states` in `marie_providers_circuit_state` until the returned handle
    is closed or dropped (keep it beside the router)."""
    source = _Source(states)
    _COLLECTOR.add(source)
    return source
