"""`marie-gateway`: serve the HTTP gateway with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import uvicorn
from marie_kit.logs import setup_logging
from marie_kit.settings import load_settings

from marie_gateway.app import RequestContext, create_app
from marie_gateway.settings import GatewaySettings


def main() -> None:
    settings = load_settings(GatewaySettings)
    setup_logging("gateway", settings.log_level)
    config = uvicorn.Config(
        RequestContext(create_app(settings)),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # our own access log carries the request id
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
