"""An extraction job's payload: the AddMemories request as JSON (the core writes it
when it queues a call, the extraction queue reads it back)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from marie_memory.records import AddRequest, SourceMessage


def encode_request(request: AddRequest) -> str:
    value = asdict(request)
    value["metadata"] = dict(request.metadata)
    return json.dumps(value, ensure_ascii=False)


def decode_request(payload: str) -> AddRequest:
    value: dict[str, Any] = json.loads(payload)
    value["messages"] = tuple(SourceMessage(**m) for m in value["messages"])
    value["categories"] = tuple(value["categories"])
    return AddRequest(**value)
