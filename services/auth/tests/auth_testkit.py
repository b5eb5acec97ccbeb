"""Helpers shared by the auth service's tests (a uniquely named module, so it
cannot clash with other services' test helpers on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from marie.auth.v1 import auth_service_pb2 as pb
from marie_auth.settings import AuthSettings
from marie_kit.server import RunningServer

from tests.grpc_testing import rpc_error

if TYPE_CHECKING:
    from marie.auth.v1.auth_service_pb2_grpc import AuthServiceAsyncStub as AuthStub
else:
    AuthStub = Any

__all__ = ["AuthStub", "CreateKey", "FakeClock", "StartAuth", "rpc_error"]

#: The `start_auth` fixture: starts an auth server over the given settings.
StartAuth = Callable[[AuthSettings], Awaitable[RunningServer]]
#: The `create` fixture: CreateApiKey with keyword fields (name defaults to "test-key").
CreateKey = Callable[..., Awaitable[pb.CreateApiKeyResponse]]


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
