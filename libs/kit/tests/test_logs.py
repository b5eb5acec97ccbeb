"""The JSON-lines log format every service writes."""

from __future__ import annotations

import logging

import orjson
from marie_kit.context import request_id_var
from marie_kit.logs import JsonFormatter


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "marie.access", "levelname": "INFO", "msg": "rpc"})
    record.created = created
    record.msecs = (created - int(created)) * 1000
    record.__dict__.update(extra)
    return record


def test_a_line_has_utc_time_service_request_id_and_extras() -> None:
    formatter = JsonFormatter("providers")
    token = request_id_var.set("req-1")
    try:
        line = orjson.loads(formatter.format(_record(1_700_000_000.25, method="/x", code="OK")))
    finally:
        request_id_var.reset(token)
    assert line == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "info",
        "service": "providers",
        "logger": "marie.access",
        "message": "rpc",
        "request_id": "req-1",
        "method": "/x",
        "code": "OK",
    }


def test_the_time_follows_each_record_across_seconds() -> None:
    formatter = JsonFormatter("gateway")
    times = [
        orjson.loads(formatter.format(_record(at)))["time"]
        for at in (1_700_000_000.875, 1_700_000_001.125, 1_700_000_001.5, 1_700_000_060.0)
    ]
    assert times == [
        "2023-11-14T22:13:20.875Z",
        "2023-11-14T22:13:21.125Z",
        "2023-11-14T22:13:21.500Z",
        "2023-11-14T22:14:20.000Z",
    ]
