"""Fixtures: a real auth server on an ephemeral port over a real SQLite file in tmp_path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# `auth_testkit` is importable through the pytest `pythonpath` setting; it is
# uniquely named so it clashes with no other service's helpers.
from auth_testkit import AuthStub, CreateKey, FakeClock, StartAuth
from marie.auth.v1 import auth_service_pb2 as pb
from marie.auth.v1 import auth_service_pb2_grpc as pb_grpc
from marie_auth.opensearch_store import index_prefix
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_kit.channels import insecure_channel
from marie_kit.server import RunningServer, start_server

# Short enough that expiry events arrive within a test's patience.
EXPIRY_CHECK_SECONDS = 0.02
STOP_GRACE_SECONDS = 0.5


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


#: Every store the service runs on: the whole suite (keys, events, replicas,
#: usage, leases) is the store contract, run against each.
STORE_KINDS = ["sqlite", "opensearch"]


@pytest.fixture(params=STORE_KINDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> AuthSettings:
    """SQLite on a file in tmp_path; OpenSearch on the cluster at OPENSEARCH_URL
    when set, else on a fresh osmem-server clone (indices under a prefix of
    this test's own)."""
    # Explicit values win over whatever MARIE_* variables the environment holds.
    if request.param == "sqlite":
        return AuthSettings(data_dir=tmp_path / "data", port=0, pepper=None, store="sqlite")
    url = os.environ.get("OPENSEARCH_URL") or request.getfixturevalue("osmem_clone").url
    return AuthSettings(
        data_dir=tmp_path / "data",
        port=0,
        pepper=None,
        store="opensearch",
        opensearch_url=url,
        opensearch_index_prefix=index_prefix(str(tmp_path)),
    )


@pytest.fixture
async def start_auth(clock: FakeClock) -> AsyncIterator[StartAuth]:
    """Starts auth servers (each on a fresh port); stops those still running at the end."""
    running: list[RunningServer] = []

    async def start(settings: AuthSettings) -> RunningServer:
        component = AuthComponent(settings, clock=clock, expiry_check_seconds=EXPIRY_CHECK_SECONDS)
        server = await start_server([component])
        running.append(server)
        return server

    yield start
    for server in running:
        await server.stop(STOP_GRACE_SECONDS)


@pytest.fixture
async def server(start_auth: StartAuth, settings: AuthSettings) -> RunningServer:
    return await start_auth(settings)


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[AuthStub]:
    async with insecure_channel(server.target) as channel:
        yield pb_grpc.AuthServiceStub(channel)


@pytest.fixture
def create(stub: AuthStub) -> CreateKey:
    """Creates a key through the API; keyword arguments are CreateApiKeyRequest fields."""

    async def create_key(**fields: Any) -> pb.CreateApiKeyResponse:
        fields.setdefault("name", "test-key")
        return await stub.CreateApiKey(pb.CreateApiKeyRequest(**fields))

    return create_key
