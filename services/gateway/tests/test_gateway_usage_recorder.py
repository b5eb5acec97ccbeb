"""The gateway's usage recorder against a real auth server: batches while
auth is down are kept and sent once it is up; a full queue drops (never
blocks); shutdown sends what is left; with a spool, a killed process's
records are sent by the next one."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit import usage
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


# -- the spool: records on disk until auth has them ------------------------------

# A process that queues records with auth unreachable, says so, and waits to
# be killed.
_KILLED = """
import asyncio, sys
from pathlib import Path
from marie.auth.v1 import auth_service_pb2_grpc as auth_grpc
from marie_kit.channels import insecure_channel
from marie_kit.usage import UsageRecorder
sys.path.insert(0, sys.argv[3])
from test_gateway_usage_recorder import records

async def main() -> None:
    stub = auth_grpc.AuthServiceStub(insecure_channel(sys.argv[1]))
    recorder = UsageRecorder(stub, flush_seconds=60, timeout=0.2, spool=Path(sys.argv[2]))
    recorder.start()
    recorder.submit(records(7, "killed"))
    recorder.submit(records(5, "later"))
    print("queued", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def segments(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.usage"))


async def wait_recorded(stub: auth_grpc.AuthServiceAsyncStub, count: int) -> int:
    for _ in range(200):
        if (total := await total_requests(stub)) >= count:
            return total
        await asyncio.sleep(0.05)
    return await total_requests(stub)


def kill_after_queueing(auth_addr: str, spool: Path) -> None:
    """Run `_KILLED` until it has queued its 12 records, then SIGKILL it."""
    here = str(Path(__file__).parent)
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED, auth_addr, str(spool), here], stdout=subprocess.PIPE
    )
    try:
        assert killed.stdout is not None
        assert killed.stdout.readline() == b"queued\n"
    finally:
        killed.kill()
        killed.wait()


async def test_records_of_a_killed_process_are_sent_by_the_next_one(tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    kill_after_queueing(f"127.0.0.1:{port}", spool)
    assert len(segments(spool)) == 1

    settings = AuthSettings(data_dir=tmp_path / "auth", port=port, pepper=None)
    server = await start_server([AuthComponent(settings)], port=port)
    channel = insecure_channel(f"127.0.0.1:{port}")
    stub = auth_grpc.AuthServiceStub(channel)
    # The next process on the spool: it sends them at once (its own timer is a minute).
    recorder = UsageRecorder(stub, flush_seconds=60, spool=spool)
    recorder.start()
    try:
        assert await wait_recorded(stub, 12) == 12
        for _ in range(100):
            if not segments(spool):
                break
            await asyncio.sleep(0.02)
        # Settled: the dead process's segment is gone.
        assert segments(spool) == []
        # Its own records go to a segment of its own, emptied once acknowledged.
        recorder.submit(records(3, "own"))
        (own,) = segments(spool)
        assert own.stat().st_size > 0
        await recorder.close()
        assert await total_requests(stub) == 15
        assert own.stat().st_size == 0
    finally:
        await recorder.close()
        await channel.close()
        await server.stop(0)


async def test_a_live_recorders_segment_is_not_taken_and_shutdown_keeps_the_rest(
    tmp_path: Path,
) -> None:
    port, spool = free_port(), tmp_path / "spool"
    channel = insecure_channel(f"127.0.0.1:{port}")
    stub = auth_grpc.AuthServiceStub(channel)
    first = UsageRecorder(stub, flush_seconds=60, timeout=0.2, spool=spool)
    first.start()
    first.submit(records(4, "first"))
    # Another recorder on the same spool leaves a living one's records alone.
    second = UsageRecorder(stub, flush_seconds=60, timeout=0.2, spool=spool)
    second.start()
    assert second.pending == 0
    await second.close()
    # Auth is down at shutdown: the records stay on disk, for the next one.
    await first.close()
    assert first.pending == 4
    assert len(segments(spool)) == 1

    third = UsageRecorder(stub, flush_seconds=60, timeout=0.2, spool=spool)
    third.start()
    assert third.pending == 4
    await third.close()
    await channel.close()


async def test_a_torn_last_record_is_left_out(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    whole = records(2, "torn")
    data = b"".join(struct.pack("<I", len(b)) + b for b in (r.SerializeToString() for r in whole))
    (spool / "0123456789abcdef.usage").write_bytes(data + struct.pack("<I", 500) + b"\x0a\x03ab")
    channel = insecure_channel(f"127.0.0.1:{free_port()}")
    recorder = UsageRecorder(
        auth_grpc.AuthServiceStub(channel), flush_seconds=60, timeout=0.2, spool=spool
    )
    recorder.start()
    assert recorder.pending == 2
    await recorder.close()
    await channel.close()


async def test_an_unusable_spool_leaves_records_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    channel = insecure_channel(f"127.0.0.1:{free_port()}")
    recorder = UsageRecorder(
        auth_grpc.AuthServiceStub(channel), flush_seconds=60, timeout=0.2, spool=blocker / "spool"
    )
    recorder.start()
    recorder.submit(records(2, "mem"))
    assert recorder.pending == 2
    await recorder.close()
    await channel.close()


async def test_a_running_recorder_takes_over_a_replica_that_died_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replicas sharing one spool: one dies and is not restarted; a running
    # one finds its segment on its next look (every ADOPT_SECONDS).
    monkeypatch.setattr(usage, "ADOPT_SECONDS", 0.1)
    port, spool = free_port(), tmp_path / "spool"
    settings = AuthSettings(data_dir=tmp_path / "auth", port=port, pepper=None)
    server = await start_server([AuthComponent(settings)], port=port)
    channel = insecure_channel(f"127.0.0.1:{port}")
    stub = auth_grpc.AuthServiceStub(channel)
    survivor = UsageRecorder(stub, flush_seconds=0.05, spool=spool)
    survivor.start()
    try:
        survivor.submit(records(2, "survivor"))
        assert await wait_recorded(stub, 2) == 2
        await asyncio.to_thread(kill_after_queueing, f"127.0.0.1:{port}", spool)
        assert await wait_recorded(stub, 14) == 14
    finally:
        await survivor.close()
        await channel.close()
        await server.stop(0)
