"""What every HTTP surface of the gateway shares: JSON responses, error
responses, body validation that names the bad field, and routing helpers."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from marie_gateway.http.errors import ApiError, bad_request

M = TypeVar("M", bound=BaseModel)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def field_path(loc: tuple[int | str, ...], tags: frozenset[str] = frozenset()) -> str:
    """The field path of a pydantic error location, OpenAI style: `messages[0].role`.
    `tags` are the labels of tagged unions, which name no field."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            part.isidentifier()
            and part not in _TYPE_LABELS
            and part not in tags
            and not part[:1].isupper()
        ):
            # Union branch labels ("str", "list[…]", model names) are not fields.
            out += f".{part}" if out else part
    return out


def parse_body(model: type[M], raw: bytes, tags: frozenset[str] = frozenset()) -> M:
    """Validate a JSON body; 400 naming the first bad field (`tags`: see field_path)."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc, tags) from None


def validation_error(exc: ValidationError, tags: frozenset[str] = frozenset()) -> ApiError:
    """The 400 for a failed validation, naming the field that says most."""
    errors = exc.errors(include_url=False)
    # Of a union's per-branch errors, the deepest one says most about the
    # mistake ("unknown content part type", not "should be a string"); at
    # equal depth, a broken rule beats a mere "wrong type" for another branch.
    first = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    if first["type"] == "json_invalid":
        message = f"The request body is not valid JSON: {first['msg']}"
        return bad_request(message, code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("The request body must be a JSON object.", code="invalid_json")
    param = field_path(first["loc"], tags)
    where = f"'{param}': " if param else ""
    code = "missing_field" if first["type"] == "missing" else "invalid_value"
    return bad_request(f"Invalid request: {where}{first['msg']}", param or None, code)
