"""Health endpoints: `/healthz` (the process is up) and `/readyz` (the services
it needs answer SERVING)."""

from __future__ import annotations

import asyncio

from marie_kit.channels import is_serving
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.core import Gateway
from marie_gateway.http.bodies import JSONResponse

# A readiness probe must answer fast even when a service hangs.
PROBE_TIMEOUT_SECONDS = 1.0


# The answer of both endpoints, as the OpenAPI document shows it.
class Health(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: str
    checks: dict[str, bool] | None = None


def routes(gw: Gateway) -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        b = gw.backends()
        providers, auth, memory = await asyncio.gather(
            is_serving(b.providers_channel, timeout=PROBE_TIMEOUT_SECONDS),
            is_serving(b.auth_channel, timeout=PROBE_TIMEOUT_SECONDS),
            is_serving(b.memory_channel, timeout=PROBE_TIMEOUT_SECONDS),
        )
        checks = {"providers": providers, "auth": auth, "memory": memory}
        ready = providers and auth and not gw.draining
        # Chats go on without memory (enrichment is best effort), so a memory
        # service that cannot serve (down, or its store full) is reported but
        # does not take the gateway out of its load balancer.
        status = "not ready" if not ready else "ready" if memory else "degraded"
        return JSONResponse({"status": status, "checks": checks}, 200 if ready else 503)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
