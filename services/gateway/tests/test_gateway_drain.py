"""The gateway's shutdown with a drain delay: readiness turns 503 at once,
and requests are still answered until the delay is over (a load balancer that
polls readiness stops sending them meanwhile, instead of having them refused)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import httpx
import uvicorn
from marie_gateway.http.server import GatewayServer


class _Gateway:
    def __init__(self) -> None:
        self.drain_began = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self.drain_began.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        if value:
            self.drain_began.set()

    def cut_calls(self) -> None:
        pass


def _app(gateway: _Gateway) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status = 503 if gateway.draining and scope["path"] == "/readyz" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_requests_are_answered_during_the_drain_delay_while_readyz_says_503() -> None:
    gateway = _Gateway()
    port = _free_port()
    config = uvicorn.Config(_app(gateway), port=port, lifespan="off", log_config=None)
    server = GatewayServer(config, gateway, drain_delay=60)
    server.should_exit = True  # shutdown begins as soon as it has started
    serving = asyncio.create_task(server.serve())
    await gateway.drain_began.wait()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/v1/models")).status_code == 200
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    server.drain_delay = 0
    await server.shutdown()
