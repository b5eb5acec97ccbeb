"""Envoy (deploy/envoy/envoy.yaml, run for real) retries an idempotent gRPC
call that a dying replica answers UNAVAILABLE, once, on another replica; a
call that is not idempotent is not retried once it reached a replica.

The providers cluster gets two hosts: real gRPC servers, one answering every
call UNAVAILABLE (a replica shutting down, still reported SERVING until its
next health check), one answering. Calls go through the private
providers_mesh listener (the gateway's hop), whose idempotent routes share
their retry policy with the public listener's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.envoy import Envoy, start_envoy
from tests.stack import free_ports

SERVICE = "marie.providers.v1.ProviderService"
CALLS = 20


@dataclass
class Replica:
    dying: bool
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: grpc.Server | None = None
    port: int = 0

    def handler(self, method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self.lock:
                self.calls.append(method)
            if self.dying:
                context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            return b""

        return grpc.unary_unary_rpc_method_handler(answer, lambda b: b, lambda b: b)

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        methods = ("ListModels", "CreateChatCompletion", "StreamChatCompletion")
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {m: self.handler(m) for m in methods}),)
        )
        checks = health.HealthServicer()
        checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Replica, Replica]]:
    pair = (Replica(dying=True), Replica(dying=False))
    for r in pair:
        r.start()
    yield pair
    for r in pair:
        assert r.server is not None
        r.server.stop(0)


@pytest.fixture(scope="module")
def envoy(
    replicas: tuple[Replica, Replica], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    dying, healthy = replicas
    unused = free_ports(3)

    def two_providers(config: dict[str, Any]) -> None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "providers":
                group = cluster["load_assignment"]["endpoints"][0]
                group["lb_endpoints"] = [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {"address": "127.0.0.1", "port_value": r.port}
                            }
                        }
                    }
                    for r in (dying, healthy)
                ]

    running = start_envoy(
        Path(tmp_path_factory.mktemp("envoy-retries")),
        {"gateway": unused[0], "providers": healthy.port, "auth": unused[1], "memory": unused[2]},
        two_providers,
    )
    yield running
    running.stop()


def _outcomes(envoy: Envoy, method: str) -> list[str]:
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{envoy.ports['providers_mesh']}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", lambda b: b, lambda b: b)
        for _ in range(CALLS):
            try:
                call(b"", timeout=5)
                out.append("OK")
            except grpc.RpcError as exc:
                out.append(exc.code().name)
    return out


def test_an_idempotent_call_is_retried_on_the_other_replica(
    envoy: Envoy, replicas: tuple[Replica, Replica]
) -> None:
    dying, healthy = replicas
    assert _outcomes(envoy, "ListModels") == ["OK"] * CALLS
    assert healthy.calls.count("ListModels") == CALLS
    assert dying.calls.count("ListModels") >= 1  # tried, then retried elsewhere


@pytest.mark.parametrize("method", ["CreateChatCompletion", "StreamChatCompletion"])
def test_a_chat_that_reached_a_replica_is_not_run_again(
    method: str, envoy: Envoy, replicas: tuple[Replica, Replica]
) -> None:
    dying, _ = replicas
    outcomes = _outcomes(envoy, method)
    assert "UNAVAILABLE" in outcomes and "OK" in outcomes
    assert dying.calls.count(method) == outcomes.count("UNAVAILABLE")
