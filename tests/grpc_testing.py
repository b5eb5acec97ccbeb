"""Helpers every gRPC test shares."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from marie_kit.errors import ServiceError


async def rpc_error(call: Awaitable[Any]) -> ServiceError:
    """The ServiceError a unary call failed with; AssertionError if it succeeded."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return ServiceError.from_rpc_error(exc)
    raise AssertionError("the call succeeded")
