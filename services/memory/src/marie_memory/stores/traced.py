"""A store whose every call is a span (MARIE_TRACE_STORE_CALLS=true, with
tracing on): for finding which store call a slow request waited on. Off by
default: a search makes several store calls, and their spans would outnumber
the rest of a trace's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from marie_kit import tracing

from marie_memory.stores.contract import Store


class TracedStore:
    """Wraps `store`: its coroutine methods run inside a CLIENT span named
    `store.<method>`, with the kind of store (`db.system.name`); nothing of
    the call's arguments is recorded (they hold users' data)."""

    def __init__(self, store: Store, system: str) -> None:
        self._store = store
        self._system = system

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not inspect.iscoroutinefunction(value):
            return value
        return self._traced(name, value)

    def _traced(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        attributes = {"db.system.name": self._system, "db.operation.name": name}

        async def call(*args: Any, **kwargs: Any) -> Any:
            with tracing.store_span(f"store.{name}", attributes):
                return await method(*args, **kwargs)

        return call
