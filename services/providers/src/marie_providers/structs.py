"""google.protobuf.Struct to plain JSON values, the way upstream APIs expect them."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2


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
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None
