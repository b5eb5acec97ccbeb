"""A gateway killed with answered requests' ledger rows still queued loses
none of them: the rows wait in the usage spool (`marie_kit.usage_spool`) and
the restarted gateway sends them. Real processes (`marie up`), really killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fakes import FakeOllama
from tests.stack import Stack, start_stack

MODEL = "ollama/llama3.2:latest"


def usage_total(stack: Stack, key: str) -> dict[str, Any]:
    reply = httpx.get(
        f"{stack.base_url}/api/usage", headers={"authorization": f"Bearer {key}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    total: dict[str, Any] = reply.json()["total"]
    return total


def test_a_killed_gateway_loses_no_usage_rows(ollama: FakeOllama, tmp_path: Path) -> None:
    # Rows would wait a minute before being sent: all of them are still
    # queued when the gateway is killed.
    stack = start_stack(tmp_path / "marie", ollama.base_url, MARIE_GATEWAY_USAGE_FLUSH_SECONDS="60")
    try:
        key = stack.create_key("spooled")
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=10) as client:
            for _ in range(4):
                assert client.post("/v1/chat/completions", json=body).status_code == 200
            for _ in range(2):
                streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
                assert streamed.status_code == 200
                assert streamed.text.rstrip().endswith("data: [DONE]")
        assert usage_total(stack, key)["requests"] == 0

        gateway = stack.service_pids()["gateway"]
        os.kill(gateway, signal.SIGKILL)
        stack.wait_for_log("marie: gateway exited with code -9")
        stack.wait_for_log(f"marie: gateway is back, ready on 127.0.0.1:{stack.gateway_port}")

        deadline = time.monotonic() + 20
        while (total := usage_total(stack, key))["requests"] < 6:
            assert time.monotonic() < deadline, total
            time.sleep(0.1)
        assert total["requests"] == 6
        assert total["prompt_tokens"] > 0
        assert total["completion_tokens"] > 0
        # Sent and acknowledged: nothing is left waiting on disk.
        spool = tmp_path / "marie" / "usage-spool"
        assert all(f.stat().st_size == 0 for f in spool.glob("*.usage"))
    finally:
        stack.stop()
