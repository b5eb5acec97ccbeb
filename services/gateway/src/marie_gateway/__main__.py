"""`marie-gateway`: serve the HTTP gateway (uvicorn, uvloop, httptools; see http/server.py)."""

from __future__ import annotations

import uvicorn
from marie_kit import tracing
from marie_kit.logs import setup_logging
from marie_kit.prices import PriceError
from marie_kit.settings import load_settings
from marie_kit.tracing import setup_tracing

from marie_gateway.app import create_app
from marie_gateway.http.server import GatewayServer, protocol_class
from marie_gateway.settings import GatewaySettings


def main() -> None:
    settings = load_settings(GatewaySettings)
    setup_logging("gateway", settings.log_level)
    setup_tracing("gateway")
    try:
        app = create_app(settings)
    except PriceError as exc:
        raise SystemExit(f"marie-gateway: {exc}") from None
    config = uvicorn.Config(
        app.traced() if tracing.enabled() else app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(settings.header_timeout_seconds),
        lifespan="on",
        access_log=False,  # our own access log carries the request id
        log_config=None,
        server_header=False,
        # X-Forwarded-For is read by the gateway itself, from trusted proxies
        # only (MARIE_GATEWAY_TRUSTED_PROXIES), never rewritten by uvicorn.
        proxy_headers=False,
        timeout_keep_alive=int(max(settings.keep_alive_seconds, 1)),
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )
    try:
        GatewayServer(config, app.gw, settings.drain_delay_seconds).run()
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
