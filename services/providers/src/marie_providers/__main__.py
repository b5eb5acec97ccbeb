"""Entry point of the providers service: `marie-providers` or `python -m marie_providers`."""

from __future__ import annotations

from marie_kit.logs import setup_logging
from marie_kit.server import run, serve
from marie_kit.settings import fail, load_settings
from marie_kit.tracing import setup_tracing

from marie_providers.config import ConfigError
from marie_providers.service import ProvidersComponent, load_config
from marie_providers.settings import ProvidersSettings


def main() -> None:
    """Read the settings, then serve until SIGTERM or SIGINT."""
    settings = load_settings(ProvidersSettings)
    try:
        config = load_config(settings)
    except ConfigError as exc:
        fail(f"invalid configuration: {exc}")
    setup_logging("providers", settings.log_level)
    setup_tracing("providers")
    component = ProvidersComponent(settings, config=config)
    run(
        serve(
            [component],
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
