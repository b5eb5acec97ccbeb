"""JSON-lines logging to stdout, with the request id and service name on every
line, and the trace and span ids on every line written inside a span."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import orjson

from marie_kit import tracing
from marie_kit.context import request_id_var

# Attributes every LogRecord has; anything else passed through `extra=` is emitted.
# uvicorn adds an ANSI-coloured copy of its messages; it has no place in JSON.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, request id, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second = -1
        self._second_text = ""

    def _time(self, record: logging.LogRecord) -> str:
        """`record.created` in UTC, to the millisecond; the seconds part is
        formatted once per second, not once per line."""
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        if tracing.STATE.enabled and (ids := tracing.current_ids()) is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def setup_logging(service: str, level: str = "INFO") -> None:
    """Route every logger to stdout as JSON lines; idempotent."""
    # The logging HOWTO's "Optimization": no caller lookup, thread or process
    # names on every record; the JSON lines never show them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (HTTP client per-request lines) would drown the access log.
    for noisy in ("httpx", "httpcore", "asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
