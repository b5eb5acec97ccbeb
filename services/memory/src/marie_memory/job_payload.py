"""An extraction job's payload: the AddMemories request as JSON (the core writes it
when it queues a call, the extraction queue reads it back); and its results, the
changes it made, as JSON (the queue writes them, the job's status reads them)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from marie_memory.records import AddRequest, AddResult, Memory, SourceMessage


def encode_request(request: AddRequest) -> str:
    value = asdict(request)
    value["metadata"] = dict(request.metadata)
    return json.dumps(value, ensure_ascii=False)


def decode_request(payload: str) -> AddRequest:
    value: dict[str, Any] = json.loads(payload)
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
