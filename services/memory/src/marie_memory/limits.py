"""The contract's limits, checked on every write (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from marie_kit.tenancy import MAX_USER_ID

from marie_memory.errors import invalid_argument

MAX_TITLE = 256
MAX_MODEL = 256
MAX_PROVIDER = 256
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_CATEGORIES = 16
MAX_CATEGORY = 64
MAX_MEMORY_TEXT = 8192
MAX_MESSAGE_BYTES = 1_048_576
MAX_QUERY = 4096
MAX_ACTOR = 128
MAX_MESSAGES = 100
MAX_NAME = 256
MAX_ID = 64
MAX_REQUEST_ID = 128


def user_id(value: str) -> str:
    if not value:
        raise invalid_argument("user_id", "user_id is required")
    if len(value) > MAX_USER_ID:
        raise invalid_argument("user_id", f"user_id is longer than {MAX_USER_ID} characters")
    return value


def required_id(field: str, value: str) -> str:
    if not value:
        raise invalid_argument(field, f"{field} is required")
    return value


def text(field: str, value: str, maximum: int, *, required: bool = False) -> str:
    if required and not value:
        raise invalid_argument(field, f"{field} is required")
    if len(value) > maximum:
        raise invalid_argument(field, f"{field} is longer than {maximum} characters")
    return value


def metadata(field: str, value: Mapping[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA_ENTRIES:
        raise invalid_argument(field, f"{field} holds more than {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY:
            raise invalid_argument(
                f"{field}[{key!r}]", f"metadata keys are 1 to {MAX_METADATA_KEY} characters"
            )
        if len(item) > MAX_METADATA_VALUE:
            raise invalid_argument(
                f"{field}[{key!r}]", f"metadata values are at most {MAX_METADATA_VALUE} characters"
            )
    return dict(value)


def categories(field: str, value: Sequence[str]) -> tuple[str, ...]:
    if len(value) > MAX_CATEGORIES:
        raise invalid_argument(field, f"at most {MAX_CATEGORIES} categories")
    if len(set(value)) != len(value):
        raise invalid_argument(field, "categories hold a duplicate")
    for i, category in enumerate(value):
        if not 1 <= len(category) <= MAX_CATEGORY:
            raise invalid_argument(
                f"{field}[{i}]", f"categories are 1 to {MAX_CATEGORY} characters"
            )
    return tuple(value)


def request_id(value: str) -> str:
    """An idempotency key: empty, or 1 to 128 printable ASCII characters."""
    if len(value) > MAX_REQUEST_ID or not all(" " <= c <= "~" for c in value):
        raise invalid_argument(
            "request_id", f"request_id is at most {MAX_REQUEST_ID} printable ASCII characters"
        )
    return value


def query(value: str) -> str:
    if not value.strip():
        raise invalid_argument("query", "query is required")
    return text("query", value, MAX_QUERY)
