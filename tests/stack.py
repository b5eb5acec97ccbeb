"""The whole suite as real processes, started by `marie up` on free ports, for
end-to-end tests. Each service runs exactly as in production: its own process,
its own port, talking gRPC."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
MARIE = Path(sys.executable).parent / "marie"
#: A suite starts in seconds on a quiet machine; on a loaded 2-core one (CI
#: neighbours, benchmarks) each service's imports alone took over 10 s, and
#: 60 s was seen to run out. Only a hung start waits this long.
START_TIMEOUT_SECONDS = 180.0
# Variables that would add real cloud providers (or a config file) from the
# machine running the tests; a test that wants one passes it explicitly.
PROVIDER_VARIABLES = frozenset(
    {
        "MARIE_CONFIG",
        "HF_TOKEN",
        "HUGGINGFACE_API_KEY",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
    }
)


def free_ports(count: int) -> list[int]:
    """Ports free right now (bound to 0, read, released together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a child process still running, SIGKILL it after `timeout`, reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    """A running suite: where to reach it, and the `marie up` process behind it."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    gateway_port: int
    providers_port: int
    auth_port: int
    memory_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def marie(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the `marie` command against this stack."""
        return subprocess.run(
            [str(MARIE), *args],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def create_key(self, name: str = "test", *extra: str) -> str:
        done = self.marie("keys", "create", "--name", name, "--json", *extra)
        assert done.returncode == 0, done.stderr
        key: str = orjson.loads(done.stdout)["key"]
        return key

    def service_pids(self) -> dict[str, int]:
        """The service processes `marie up` runs now (`python -m marie_<name>`),
        by name, from /proc."""
        pids: dict[str, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # The name may hold spaces; the parent pid follows the ')'.
                ppid = int(stat.read_text().rpartition(")")[2].split()[1])
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            if ppid == self.process.pid and len(argv) > 2 and argv[1] == b"-m":
                pids[argv[2].decode().removeprefix("marie_")] = int(stat.parent.name)
        return pids

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until `marie up` has logged `text`; AssertionError with the log if not."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> int:
        """Ctrl-C, as a person would; returns `marie up`'s exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_stack(data_dir: Path, ollama_url: str, **extra_env: str) -> Stack:
    """Start the suite with `marie up` and wait until the gateway is ready."""
    gateway, providers, auth, memory = free_ports(4)
    env = {
        **{k: v for k, v in os.environ.items() if k not in PROVIDER_VARIABLES},
        "MARIE_DATA_DIR": str(data_dir),
        "MARIE_GATEWAY_PORT": str(gateway),
        "MARIE_PROVIDERS_PORT": str(providers),
        "MARIE_AUTH_PORT": str(auth),
        "MARIE_MEMORY_PORT": str(memory),
        "OLLAMA_BASE_URL": ollama_url,
        "MARIE_GRACE_SECONDS": "2",
        # No local model servers unless a test asks (`marie up` would start
        # them whenever no provider answers).
        "MARIE_LOCAL_MODELS": "off",
        **extra_env,
    }
    log_path = data_dir / "marie-up.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(MARIE), "up"], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
    stack = Stack(process, env, log_path, gateway, providers, auth, memory)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"marie up exited with {process.returncode}:\n{stack.log()}")
        if "Marie is up." in stack.log():
            try:
                if httpx.get(f"{stack.base_url}/readyz", timeout=1).status_code == 200:
                    return stack
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    stack.stop()
    raise RuntimeError(f"marie up not ready after {START_TIMEOUT_SECONDS}s:\n{stack.log()}")
