"""`marie up` keeps the suite running: a service that crashes after having
served is restarted with backoff while the others go on serving; a crash loop
or a service that cannot start at all stops the suite with one clear line.
Real processes, really killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.fakes import FakeOllama
from tests.stack import MARIE, ROOT, Stack, free_ports, start_stack

MODEL = "ollama/llama3.2:latest"


def chat(stack: Stack, key: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]},
        timeout=10,
    )


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Until `pid` has exited and been reaped by its parent."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still there"
        time.sleep(0.005)


def occupy(port: int) -> socket.socket:
    """Listen on `port` as soon as it is free, so that a service cannot bind it."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket()
        # The killed service's connections linger in TIME_WAIT on this port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            assert time.monotonic() < deadline, f"port {port} never freed"
            time.sleep(0.005)


def test_a_crashed_service_comes_back_and_a_crash_loop_stops_the_suite(
    ollama: FakeOllama, tmp_path: Path
) -> None:
    """One suite for the whole story (a suite takes seconds to start): a crash
    after serving is repaired without touching the others; crashing again and
    again is not."""
    stack = start_stack(tmp_path / "marie", ollama.base_url, MARIE_UP_MAX_RESTARTS="2")
    try:
        key = stack.create_key("supervised")
        assert chat(stack, key).status_code == 200
        before = stack.service_pids()
        assert {"providers", "auth", "gateway"} <= before.keys()

        os.kill(before["providers"], signal.SIGKILL)
        stack.wait_for_log("marie: providers exited with code -9; restarting in 0.5 s (restart 1)")
        stack.wait_for_log(f"marie: providers is back, ready on 127.0.0.1:{stack.providers_port}")
        # The gateway serves chats again (its channel reconnects on its own).
        deadline = time.monotonic() + 15
        while (r := chat(stack, key)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        after = stack.service_pids()
        assert after["providers"] != before["providers"]
        # Every other service is the same process as before.
        others = before.keys() - {"providers"}
        assert {n: after[n] for n in others} == {n: before[n] for n in others}
        assert stack.process.poll() is None

        # Killed again soon after its restart, and every restart now fails
        # (something else holds its port): that is a crash loop.
        os.kill(after["providers"], signal.SIGKILL)
        wait_gone(after["providers"])
        with occupy(stack.providers_port):
            code = stack.process.wait(timeout=30)
    finally:
        stack.stop()
    log = stack.log()
    assert code == 1
    assert "marie: providers exited with code -9; restarting in 1.0 s (restart 2)" in log
    assert (
        "marie: providers exited with code 1 and keeps crashing "
        "(3 times in a row, each within 30 s of starting); giving up"
    ) in log
    assert "restart 3" not in log
    assert log.rstrip().endswith("marie: stopped")
    # The others were stopped, not left behind.
    assert stack.service_pids() == {}


def test_a_service_that_cannot_start_stops_the_suite_at_once(tmp_path: Path) -> None:
    gateway, providers, auth = free_ports(3)
    env = {
        **os.environ,
        "MARIE_DATA_DIR": str(tmp_path),
        "MARIE_GATEWAY_PORT": str(gateway),
        "MARIE_PROVIDERS_PORT": str(providers),
        "MARIE_AUTH_PORT": str(auth),
        "MARIE_PROVIDERS_MODEL_CACHE_TTL_SECONDS": "-1",
    }
    done = subprocess.run(
        [str(MARIE), "up"],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    # The service's own line says what is wrong, marie up's says what happened.
    assert "MARIE_PROVIDERS_MODEL_CACHE_TTL_SECONDS" in done.stderr
    assert "marie: providers exited with code 2 while starting; stopping" in done.stderr
    assert "restarting" not in done.stderr
    assert "auth ready" not in done.stdout


def test_sigterm_during_a_restart_wait_stops_everything_promptly(
    ollama: FakeOllama, tmp_path: Path
) -> None:
    stack = start_stack(tmp_path / "marie", ollama.base_url, MARIE_UP_RESTART_DELAY_SECONDS="20")
    try:
        os.kill(stack.service_pids()["providers"], signal.SIGKILL)
        stack.wait_for_log("restarting in 20.0 s (restart 1)")
        started = time.monotonic()
        stack.process.send_signal(signal.SIGTERM)
        code = stack.process.wait(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        stack.stop()
    assert code == 0
    # Grace period 2 s (tests/stack.py): well inside it, not after the 20 s wait.
    assert elapsed < 5
    assert stack.log().rstrip().endswith("marie: stopped")
    assert stack.service_pids() == {}
