"""A real OpenTelemetry Collector for tests, running the compose profile's own
config (deploy/observability/otel-collector.yaml) with local addresses.

The collector is built from Go modules: tests/collector/ is a Collector
Builder distribution (manifest.yaml, with its generated sources and go.sum
committed) of the core components that config uses, pinned at v0.165.0.
`collector_binary()` runs `go build` once per version of those sources and
caches the binary under `~/.cache/marie/otelcol` (or `MARIE_OTELCOL_CACHE`);
Go's own module and build caches make a rebuild after a source change cheap.

`start_collector()` rewrites only addresses, as tests/envoy.py does for
Envoy: the OTLP receiver's gRPC and HTTP endpoints bind free ports on
127.0.0.1, and every exporter of the traces pipeline sends to a test's
receiver (tests/otlp_receiver.py, over gRPC as the `otlp` exporter speaks)
instead of Jaeger; the collector's own metrics are off (they would bind
:8888 on every collector). Its processors (memory_limiter, batch) are the
file's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.stack import ROOT, free_ports, stop_process

SOURCE = ROOT / "tests" / "collector"
CONFIG = ROOT / "deploy" / "observability" / "otel-collector.yaml"
#: A cold build downloads ~500 MB of modules and compiles for minutes (11 on a
#: 2-core machine at load 13 to 37); this only stops a hung build.
BUILD_TIMEOUT_SECONDS = 1800.0
START_TIMEOUT_SECONDS = 60.0
#: What the collector logs once every pipeline is running.
READY_LINE = "Everything is ready"

Config = dict[str, Any]


def cache_dir() -> Path:
    configured = os.environ.get("MARIE_OTELCOL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "marie" / "otelcol"


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        if path.suffix in {".go", ".mod", ".sum"}:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def collector_binary() -> Path:
    """The collector built from tests/collector/, once per version of its
    sources (parallel test workers wait on one build)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"marie-otelcol-{_sources_digest()}"
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        go = shutil.which("go")
        if go is None:
            raise RuntimeError(
                "the tests' OpenTelemetry Collector is built from Go modules: install Go 1.26+"
            )
        partial = binary.with_suffix(".partial")
        done = subprocess.run(
            [go, "build", "-trimpath", "-o", str(partial), "."],
            cwd=SOURCE,
            # go.sum pins every module; a build never changes go.mod.
            env={**os.environ, "GOFLAGS": "-mod=readonly"},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the collector failed:\n{done.stderr[-4000:]}")
        partial.rename(binary)
    return binary


def validate(binary: Path, config_path: Path) -> subprocess.CompletedProcess[str]:
    """`otelcol validate`: the config parses, every component it names exists
    and accepts its settings, and the pipelines are well formed."""
    return subprocess.run(
        [str(binary), "validate", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_config() -> Config:
    config: Config = yaml.safe_load(CONFIG.read_text())
    return config


def rewrite_addresses(config: Config, grpc_port: int, http_port: int, downstream: str) -> Config:
    """`config` listening on 127.0.0.1 and exporting traces to `downstream`
    (host:port of an OTLP/gRPC receiver)."""
    protocols = config["receivers"]["otlp"]["protocols"]
    protocols["grpc"]["endpoint"] = f"127.0.0.1:{grpc_port}"
    protocols["http"]["endpoint"] = f"127.0.0.1:{http_port}"
    for name in config["service"]["pipelines"]["traces"]["exporters"]:
        assert name.split("/")[0] == "otlp", f"{name}: only OTLP/gRPC exporters are redirected"
        config["exporters"][name]["endpoint"] = downstream
    # The collector's own metrics would bind :8888, the same port for every
    # collector on the machine (parallel test runs).
    config["service"]["telemetry"] = {"metrics": {"level": "none"}}
    return config


@dataclass
class Collector:
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def grpc_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with OTEL_EXPORTER_OTLP_PROTOCOL=grpc."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT with http/protobuf (the default)."""
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def start_collector(binary: Path, workdir: Path, downstream: str) -> Collector:
    """Start the collector on the project's config with local addresses; return
    once it logs that every pipeline runs."""
    grpc_port, http_port = free_ports(2)
    config = rewrite_addresses(load_config(), grpc_port, http_port, downstream)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "otel-collector.json"
    config_path.write_bytes(orjson.dumps(config))  # JSON is YAML
    log_path = workdir / "otel-collector.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    collector = Collector(process, grpc_port, http_port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while READY_LINE not in collector.log():
        if process.poll() is not None or time.monotonic() > deadline:
            collector.stop()
            raise RuntimeError(f"the collector did not start:\n{collector.log()[-4000:]}")
        time.sleep(0.05)
    return collector
