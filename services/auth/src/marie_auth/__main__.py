"""`marie-auth`: run the auth service until SIGTERM or SIGINT."""

from __future__ import annotations

from marie_kit.logs import setup_logging
from marie_kit.server import run, serve
from marie_kit.settings import load_settings
from marie_kit.tracing import setup_tracing

from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings


def main() -> None:
    settings = load_settings(AuthSettings)
    setup_logging("auth", settings.log_level)
    setup_tracing("auth")
    run(
        serve(
            [AuthComponent(settings)],
            host=settings.host,
            port=settings.port,
            grace=settings.grace_seconds,
            drain_delay=settings.drain_delay_seconds,
            metrics_port=settings.metrics_port,
            max_connection_age=settings.max_connection_age_seconds,
        )
    )


if __name__ == "__main__":
    main()
