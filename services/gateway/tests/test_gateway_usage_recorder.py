"""The gateway's usage recorder against a real auth server: batches while
auth is down are kept and sent once it is up; a full queue drops (never
blocks); shutdown sends what is left."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel
from marie_kit.server import start_server
from marie_kit.usage import UsageRecorder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def records(n: int, prefix: str) -> list[auth_pb.UsageRecord]:
    at = Timestamp()
    at.GetCurrentTime()
    return [
        auth_pb.UsageRecord(
            id=f"{prefix}{i}",
            key_id="key_r",
            model="ollama/m:latest",
            operation="chat",
            prompt_tokens=1,
            completion_tokens=2,
            latency_ms=3.0,
            status=200,
            time=at,
        )
        for i in range(n)
    ]


async def total_requests(stub: auth_grpc.AuthServiceAsyncStub) -> int:
    start, end = Timestamp(seconds=1), Timestamp()
    end.GetCurrentTime()
    end.seconds += 60
    reply = await stub.QueryUsage(auth_pb.QueryUsageRequest(start_time=start, end_time=end))
    return reply.total.requests


async def test_records_wait_for_auth_and_arrive_once_it_is_up(tmp_path: Path) -> None:
    port = free_port()
    channel = insecure_channel(f"127.0.0.1:{port}")
    stub = auth_grpc.AuthServiceStub(channel)
    recorder = UsageRecorder(stub, max_queue=100, batch_size=10, flush_seconds=0.05, timeout=0.5)
    recorder.start()
    try:
        # Auth is down: submitting returns at once and nothing is lost.
        recorder.submit(records(25, "a"))
        await asyncio.sleep(0.3)
        assert recorder.pending == 25

        settings = AuthSettings(data_dir=tmp_path, port=port, pepper=None)
        server = await start_server([AuthComponent(settings)], port=port)
        try:
            for _ in range(200):
                if recorder.pending == 0:
                    break
                await asyncio.sleep(0.05)
            assert recorder.pending == 0
            assert await total_requests(stub) == 25

            # Shutdown sends what is still queued, without waiting for the timer.
            recorder.submit(records(3, "b"))
            await recorder.close()
            assert recorder.pending == 0
            assert await total_requests(stub) == 28
        finally:
            await server.stop(0)
    finally:
        await recorder.close()
        await channel.close()


async def test_a_full_queue_drops_new_records_without_blocking() -> None:
    channel = insecure_channel(f"127.0.0.1:{free_port()}")
    recorder = UsageRecorder(
        auth_grpc.AuthServiceStub(channel),
        max_queue=5,
        batch_size=100,
        flush_seconds=60,
        timeout=0.2,
    )
    recorder.submit(records(8, "c"))
    assert recorder.pending == 5
    await channel.close()
