"""`marie-memory`: run the memory service until SIGTERM or SIGINT."""

from __future__ import annotations

import logging

from marie_kit.logs import setup_logging
from marie_kit.server import run, serve
from marie_kit.settings import fail, load_settings
from marie_kit.tracing import setup_tracing

from marie_memory.embedding import ModelChangeRefused
from marie_memory.service import MemoryComponent, StoreUnavailable
from marie_memory.settings import MemorySettings

log = logging.getLogger("marie.memory")


async def _serve(settings: MemorySettings) -> None:
    try:
        await serve(
            [MemoryComponent(settings)],
            host=settings.host,
            port=settings.port,
            grace=settings.grace_seconds,
            drain_delay=settings.drain_delay_seconds,
            metrics_port=settings.metrics_port,
            max_connection_age=settings.max_connection_age_seconds,
        )
    except (ModelChangeRefused, StoreUnavailable) as exc:
        fail(str(exc))


def main() -> None:
    settings = load_settings(MemorySettings)
    setup_logging("memory", settings.log_level)
    setup_tracing("memory")
    run(_serve(settings))


if __name__ == "__main__":
    main()
