"""An extraction job's payload: the AddMemories request as JSON (the core writes it
when it queues a call, the extraction queue reads it back), with the trace
context of the call that queued it; and its results, the changes it made, as
JSON (the queue writes them, the job's status reads them)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from marie_memory.records import AddRequest, AddResult, Memory, SourceMessage

#: The payload's key for the W3C trace context (`traceparent`, `tracestate`)
#: of the call that queued the job; absent when tracing was off.
TRACE_CONTEXT_KEY = "trace_context"


def encode_request(request: AddRequest, trace_context: dict[str, str] | None = None) -> str:
    value = asdict(request)
    value["metadata"] = dict(request.metadata)
    if trace_context:
        value[TRACE_CONTEXT_KEY] = trace_context
    return json.dumps(value, ensure_ascii=False)


def decode_trace_context(payload: str) -> dict[str, str]:
    """The trace context a job's payload carries; empty when none (or unreadable)."""
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    carried = value.get(TRACE_CONTEXT_KEY) if isinstance(value, dict) else None
    if not isinstance(carried, dict):
        return {}
    return {k: v for k, v in carried.items() if isinstance(k, str) and isinstance(v, str)}


def decode_request(payload: str) -> AddRequest:
    value: dict[str, Any] = json.loads(payload)
    value.pop(TRACE_CONTEXT_KEY, None)
    value["messages"] = tuple(SourceMessage(**m) for m in value["messages"])
    value["categories"] = tuple(value["categories"])
    return AddRequest(**value)


def encode_results(results: list[AddResult]) -> str:
    return json.dumps(
        [
            {"event": r.event, "memory": asdict(r.memory), "previous_text": r.previous_text}
            for r in results
        ],
        ensure_ascii=False,
    )


def decode_results(text: str) -> list[AddResult]:
    if not text:
        return []
    out = []
    for item in json.loads(text):
        memory = dict(item["memory"])
        memory["categories"] = tuple(memory["categories"])
        memory["source_message_ids"] = tuple(memory["source_message_ids"])
        out.append(AddResult(item["event"], Memory(**memory), item.get("previous_text", "")))
    return out
