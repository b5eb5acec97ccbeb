"""The auth service when its store has no room left, over real gRPC on a real
SQLite file capped by MARIE_AUTH_DB_MAX_BYTES (SQLite's own SQLITE_FULL, the
error a full disk gives): writes are STORAGE_FULL and store nothing of the
batch, keys still validate, health is NOT_SERVING until a write succeeds."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
from auth_testkit import StartAuth, rpc_error
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel, is_serving
from test_auth_usage import record

SERVICE = "marie.auth.v1.AuthService"


async def _wait_serving(channel: grpc.aio.Channel, serving: bool) -> None:
    for _ in range(300):  # the store is probed every 2 s
        if await is_serving(channel, SERVICE) == serving:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never became {'SERVING' if serving else 'NOT_SERVING'}")


async def test_a_full_store_refuses_writes_and_is_not_ready_until_it_can_write(
    start_auth: StartAuth, tmp_path: Path
) -> None:
    settings = AuthSettings(
        data_dir=tmp_path / "data", port=0, pepper=None, store="sqlite", db_max_bytes=1024 * 1024
    )
    server = await start_auth(settings)
    async with insecure_channel(server.target) as channel:
        stub = pb_grpc.AuthServiceStub(channel)
        key = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="before"))
        batches = 0
        while batches < 100:
            batch = [record(f"b{batches}-{i}", model="m" * 200) for i in range(1000)]
            try:
                await stub.RecordUsage(pb.RecordUsageRequest(records=batch))
            except grpc.aio.AioRpcError:
                break
            batches += 1
        assert 0 < batches < 100

        refused = await rpc_error(
            stub.RecordUsage(
                pb.RecordUsageRequest(
                    records=[record(f"late-{i}", model="m" * 200) for i in range(1000)]
                )
            )
        )
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "STORAGE_FULL",
        )
        assert refused.domain == "marie.auth"
        await _wait_serving(channel, False)
        # Validation is a read: keys in use go on working.
        valid = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=key.key))
        assert valid.principal.key_id == key.api_key.id
        # Nothing of a refused batch was stored.
        db = sqlite3.connect(settings.db_path)
        try:
            late = db.execute("SELECT count(*) FROM usage_records WHERE id LIKE 'late-%'")
            assert late.fetchone()[0] == 0
            # An operator prunes the ledger: the service finds room by itself.
            db.execute("DELETE FROM usage_records")
            db.commit()
        finally:
            db.close()
        await _wait_serving(channel, True)
        made = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="after"))
        assert made.api_key.name == "after"
