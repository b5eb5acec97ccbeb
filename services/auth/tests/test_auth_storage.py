"""The SQLite store: digests only, WAL, and data that outlives the process."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from pathlib import Path

import pytest
from auth_testkit import AuthStub, CreateKey, StartAuth, rpc_error
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel
from marie_kit.server import RunningServer
from pydantic import SecretStr


@pytest.fixture
def settings(tmp_path: Path) -> AuthSettings:
    """These tests read the SQLite file itself."""
    return AuthSettings(data_dir=tmp_path / "data", port=0, pepper=None, store="sqlite")


def _with_pepper(settings: AuthSettings, pepper: str) -> AuthSettings:
    return AuthSettings(data_dir=settings.data_dir, port=0, pepper=SecretStr(pepper))


def _rows(db_path: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM api_keys").fetchall()


def _database_bytes(db_path: Path) -> bytes:
    """The database file and its WAL, where recent writes live until a checkpoint."""
    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


async def test_the_database_holds_the_digest_not_the_key(
    create: CreateKey, settings: AuthSettings
) -> None:
    created = await create()

    (row,) = _rows(settings.db_path)

    assert row["digest"] == hashlib.sha256(created.key.encode()).hexdigest()
    assert created.key.encode() not in _database_bytes(settings.db_path)
    assert created.key[3:].encode() not in _database_bytes(settings.db_path)
    assert all(created.key not in str(value) for value in tuple(row))


async def test_the_database_is_created_in_wal_mode_under_the_data_dir(
    server: RunningServer, settings: AuthSettings
) -> None:
    assert settings.db_path == settings.data_dir / "auth.sqlite3"
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_pepper_makes_the_digest_an_hmac(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    pepper = "pepper-A-0123456789"
    running = await start_auth(_with_pepper(settings, pepper))
    async with insecure_channel(running.target) as channel:
        stub: AuthStub = pb_grpc.AuthServiceStub(channel)
        created = await stub.CreateApiKey(pb.CreateApiKeyRequest(name="peppered"))

    (row,) = _rows(settings.db_path)

    expected = hmac.new(pepper.encode(), created.key.encode(), hashlib.sha256).hexdigest()
    assert row["digest"] == expected
    assert row["digest"] != hashlib.sha256(created.key.encode()).hexdigest()


async def test_a_key_created_under_one_pepper_fails_under_another(
    start_auth: StartAuth, settings: AuthSettings
) -> None:
    first = await start_auth(_with_pepper(settings, "pepper-A-0123456789"))
    async with insecure_channel(first.target) as channel:
        created = await pb_grpc.AuthServiceStub(channel).CreateApiKey(
            pb.CreateApiKeyRequest(name="peppered")
        )
    await first.stop(0)

    second = await start_auth(_with_pepper(settings, "pepper-B-0123456789"))
    async with insecure_channel(second.target) as channel:
        error = await rpc_error(
            pb_grpc.AuthServiceStub(channel).ValidateApiKey(
                pb.ValidateApiKeyRequest(key=created.key)
            )
        )

    assert error.reason == "INVALID_API_KEY"


async def test_keys_survive_a_server_restart(start_auth: StartAuth, settings: AuthSettings) -> None:
    first = await start_auth(settings)
    async with insecure_channel(first.target) as channel:
        created = await pb_grpc.AuthServiceStub(channel).CreateApiKey(
            pb.CreateApiKeyRequest(name="durable", owner="team-a", scopes=["chat"])
        )
    await first.stop(0)

    second = await start_auth(settings)
    async with insecure_channel(second.target) as channel:
        stub: AuthStub = pb_grpc.AuthServiceStub(channel)
        got = await stub.GetApiKey(pb.GetApiKeyRequest(id=created.api_key.id))
        validated = await stub.ValidateApiKey(pb.ValidateApiKeyRequest(key=created.key))

    assert got.api_key == created.api_key
    assert validated.principal.key_id == created.api_key.id
