"""A real Prometheus and promtool for tests: Debian bookworm's `prometheus`
package (2.42; both binaries, statically linked but for libc), downloaded
once from the Debian archive, pinned by SHA-256 and unpacked under
`~/.cache/marie/prometheus` (or `MARIE_PROMETHEUS_CACHE`).

`start_prometheus()` runs the server on a free port with a scrape
configuration of the test's choosing and the compose profile's own alert
rules (deploy/observability/alerts.yml), scraping every second so that a
test sees rates after a few seconds.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.downloads import fetch_pinned
from tests.stack import ROOT, free_ports, stop_process

PACKAGE = "prometheus_2.42.0+ds-5+deb12u1_amd64.deb"
URL = f"http://deb.debian.org/debian/pool/main/p/prometheus/{PACKAGE}"
SHA256 = "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55"
ALERTS = ROOT / "deploy" / "observability" / "alerts.yml"
START_TIMEOUT_SECONDS = 60.0


def cache_dir() -> Path:
    configured = os.environ.get("MARIE_PROMETHEUS_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "marie" / "prometheus"


def binaries() -> Path:
    """The directory holding `prometheus` and `promtool` (unpacked once)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    unpacked = cache / PACKAGE.removesuffix(".deb")
    with (cache / ".unpack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (unpacked / "usr" / "bin" / "promtool").exists():
            package = fetch_pinned(URL, SHA256, cache / PACKAGE)
            partial = unpacked.with_suffix(".partial")
            subprocess.run(["dpkg-deb", "-x", str(package), str(partial)], check=True)
            partial.replace(unpacked)
    return unpacked / "usr" / "bin"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries() / "promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result; AssertionError with Prometheus's own
        message if it refuses the expression."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["data"]

    def log(self) -> str:
        return (Path(self.workdir.name) / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)
        self.workdir.cleanup()


def start_prometheus(jobs: dict[str, list[str]]) -> Prometheus:
    """Prometheus scraping `jobs` (job name → `host:port` targets, metrics at
    `/metrics`) every second, evaluating the project's alert rules."""
    workdir = tempfile.TemporaryDirectory(prefix="marie-prometheus-")
    here = Path(workdir.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    (here / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    with (here / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(binaries() / "prometheus"),
                f"--config.file={here / 'prometheus.yml'}",
                f"--storage.tsdb.path={here / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", workdir)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_text = prometheus.log()
            workdir.cleanup()
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log_text}")
        try:
            if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                return prometheus
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    text = prometheus.log()
    prometheus.stop()
    raise RuntimeError(f"prometheus not ready after {START_TIMEOUT_SECONDS}s:\n{text}")
