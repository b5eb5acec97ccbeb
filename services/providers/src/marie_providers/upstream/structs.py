"""Request values as upstream JSON bodies take them: JSON Schemas, free-form JSON, proto floats."""

from __future__ import annotations

import json
from typing import Any

import orjson
from google.protobuf import struct_pb2

# Doubles hold every whole number up to 2^53 exactly; beyond, a "whole" double
# is a rounding of what the caller wrote, and no int should pretend otherwise.
_EXACT_INT_LIMIT = 2.0**53


def schema_value(text: str, struct: struct_pb2.Struct) -> Any:
    """A JSON Schema for an orjson-encoded upstream body: the caller's own text
    when it sent one (embedded byte for byte: key order and every number kept),
    else the Struct as a dict."""
    if text:
        return orjson.Fragment(text)
    return struct_to_dict(struct)


def float32(value: float) -> float:
    """Undo float32 widening: a proto `float` 0.7 arrives as 0.699999988079071."""
    return float(f"{value:.7g}")


def parse_json_object(text: str) -> dict[str, Any] | None:
    """`text` as a dict when it is a JSON object, else None. Integers beyond
    64 bits, which orjson refuses, are valid JSON: the standard parser takes them."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(text)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, with whole numbers as ints.

    Struct stores every number as a double; a JSON Schema sent as `"maxItems": 3.0`
    is rejected by upstreams that decode such fields into integers (Go's JSON).
    """
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _EXACT_INT_LIMIT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None
