"""`python -m marie_auth` (the `marie-auth` script): serves, never logs keys, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving

START_TIMEOUT_SECONDS = 20.0


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARIE_")}
    return {**env, "MARIE_DATA_DIR": str(data_dir), "MARIE_AUTH_PORT": "0", **extra}


async def _serving_address(process: asyncio.subprocess.Process, lines: list[str]) -> str:
    assert process.stdout is not None
    while True:
        raw = await process.stdout.readline()
        if not raw:
            raise AssertionError(f"exited before serving: {lines}")
        lines.append(raw.decode())
        entry = json.loads(raw)
        if entry.get("message") == "serving":
            return str(entry["address"])


async def test_the_service_serves_never_logs_keys_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_auth",
        env=_environment(tmp_path, MARIE_LOG_LEVEL="DEBUG"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        address = await asyncio.wait_for(_serving_address(process, lines), START_TIMEOUT_SECONDS)
        await wait_until_serving(address, "marie.auth.v1.AuthService", timeout=5)
        async with insecure_channel(address) as channel:
            stub = pb_grpc.AuthServiceStub(channel)
            created = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="logged?"))
            await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    output = "".join(lines) + stdout.decode()
    assert process.returncode == 0
    assert '"message": "stopped"' in output or '"message":"stopped"' in output
    assert created.api_key.id in output
    assert created.key not in output
    assert (tmp_path / "auth.sqlite3").exists()


async def test_a_bad_setting_exits_with_one_line(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "marie_auth",
        env=_environment(tmp_path, MARIE_AUTH_STORE="postgres"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_SECONDS)

    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("invalid settings: MARIE_AUTH_STORE")
