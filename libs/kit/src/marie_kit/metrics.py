"""Prometheus metrics of every gRPC service: calls by method and status code,
latency, streams in flight; served on a port of their own when configured
(`MARIE_<SERVICE>_METRICS_PORT`, off when 0).

Labels are method names and status codes only: never a key, a prompt or
anything else a caller chose.
"""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("marie.metrics")

# Seconds; from sub-millisecond lookups to long generations.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """The label children of one metric, each looked up once: `labels()`
    validates and locks on every call, which costs more than the update itself
    on a hot path. Only for labels from a bounded set."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._cache: dict[tuple[Any, ...], M] = {}

    def __call__(self, *labels: Any) -> M:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


RPC_CALLS = Counter(
    "marie_rpc_calls",
    "gRPC calls served, by full method and status code.",
    ["method", "code"],
)
RPC_DURATION = Histogram(
    "marie_rpc_duration_seconds",
    "Time from a call's start to its end (the whole stream for streaming calls).",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
RPC_STREAMS_IN_FLIGHT = Gauge(
    "marie_rpc_streams_in_flight",
    "Server-streaming calls currently open.",
    ["method"],
)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on `host:port` (a thread of its own); returns the port."""
    server, _ = start_http_server(port, addr=host)
    bound: int = server.server_address[1]
    log.info("metrics", extra={"address": f"{host}:{bound}"})
    return bound


rpc_calls = Children(RPC_CALLS)
rpc_duration = Children(RPC_DURATION)
rpc_streams_in_flight = Children(RPC_STREAMS_IN_FLIGHT)
