"""What a key's settings must satisfy; every violation names the offending field.

Rules (the limits are also listed in the README):
- name: 1 to 100 printable characters, not only spaces;
- owner: at most 256 printable characters, may be empty, and at most 1024
  bytes percent-encoded (it travels as metadata with every call of the key);
- scopes: names from `scopes.KNOWN_SCOPES`; duplicates are dropped;
- allowed_models: model ids "provider/model" ("ollama/llama3.2:latest") or
  "provider/*" (every model of a provider), at most 256 characters each, no
  spaces; any other pattern could never match a model id and is refused; in
  all at most 2048 bytes as the call metadata that carries them;
- limits: not negative (zero means no limit);
- expire_time: in the future, when set;
- labels: at most 64; keys 1 to 63 characters without spaces, values at most 256.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping

from marie_kit.identity import (
    MAX_ALLOWED_MODELS_VALUE,
    MAX_OWNER_VALUE,
    allowed_models_value,
    encode_value,
)

from marie_auth.errors import invalid_argument
from marie_auth.scopes import KNOWN_SCOPES, normalize_scopes, unknown_scopes
from marie_auth.store import KeyLimits, KeySpec

MAX_NAME_LENGTH = 100
MAX_OWNER_LENGTH = 256
MAX_MODEL_PATTERN_LENGTH = 256
MAX_ALLOWED_MODELS = 256
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 63
MAX_LABEL_VALUE_LENGTH = 256

#: The settings UpdateApiKey may change (its update_mask paths).
SPEC_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(KeySpec))


def _check_name(name: str) -> str:
    if not 1 <= len(name) <= MAX_NAME_LENGTH or not name.strip():
        raise invalid_argument("name", f"name must be 1 to {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise invalid_argument("name", "name must not contain control characters")
    return name


def _check_owner(owner: str) -> str:
    if len(owner) > MAX_OWNER_LENGTH or not owner.isprintable():
        raise invalid_argument(
            "owner", f"owner must be at most {MAX_OWNER_LENGTH} printable characters"
        )
    if len(encode_value(owner)) > MAX_OWNER_VALUE:
        raise invalid_argument(
            "owner", f"owner must be at most {MAX_OWNER_VALUE} bytes once percent-encoded"
        )
    return owner


def _check_scopes(scopes: Collection[str]) -> tuple[str, ...]:
    unknown = unknown_scopes(scopes)
    if unknown:
        raise invalid_argument(
            "scopes", f"unknown scope {unknown[0]!r}; known scopes: {', '.join(KNOWN_SCOPES)}"
        )
    return normalize_scopes(scopes)


# "provider/model" or "provider/*"; provider names are configuration keys.
_MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/(\*|[^*\s]+)")


def _is_model_pattern(pattern: str) -> bool:
    if not 1 <= len(pattern) <= MAX_MODEL_PATTERN_LENGTH or not pattern.isprintable():
        return False
    return _MODEL_PATTERN.fullmatch(pattern) is not None


def _check_allowed_models(patterns: Collection[str]) -> tuple[str, ...]:
    if len(patterns) > MAX_ALLOWED_MODELS:
        raise invalid_argument(
            "allowed_models", f"at most {MAX_ALLOWED_MODELS} allowed models per key"
        )
    for pattern in patterns:
        if not _is_model_pattern(pattern):
            raise invalid_argument(
                "allowed_models",
                f"{pattern!r} is neither a model id 'provider/model' nor 'provider/*'",
            )
    unique = tuple(dict.fromkeys(patterns))
    if len(allowed_models_value(unique)) > MAX_ALLOWED_MODELS_VALUE:
        raise invalid_argument(
            "allowed_models",
            f"the allowed models take more than {MAX_ALLOWED_MODELS_VALUE} bytes "
            "percent-encoded; use 'provider/*' patterns",
        )
    return unique


def _check_limits(limits: KeyLimits) -> KeyLimits:
    for f in dataclasses.fields(limits):
        if getattr(limits, f.name) < 0:
            raise invalid_argument(f"limits.{f.name}", f"{f.name} must not be negative")
    return limits


def _check_expire_time(expire_time: float | None, now: float) -> float | None:
    if expire_time is not None and expire_time <= now:
        raise invalid_argument("expire_time", "expire_time must be in the future")
    return expire_time


def _check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise invalid_argument("labels", f"at most {MAX_LABELS} labels per key")
    for key, value in labels.items():
        key_ok = 1 <= len(key) <= MAX_LABEL_KEY_LENGTH and key.isprintable()
        if not key_ok or any(c.isspace() for c in key):
            raise invalid_argument(
                "labels", f"label keys must be 1 to {MAX_LABEL_KEY_LENGTH} characters, no spaces"
            )
        if len(value) > MAX_LABEL_VALUE_LENGTH or not value.isprintable():
            raise invalid_argument(
                "labels", f"label values must be at most {MAX_LABEL_VALUE_LENGTH} characters"
            )
    return dict(labels)


def checked_spec(spec: KeySpec, now: float, fields: Collection[str] = SPEC_FIELDS) -> KeySpec:
    """`spec` with `fields` checked and normalised; INVALID_ARGUMENT naming the first bad field.

    Only `fields` are looked at, so an update does not fail on a setting it
    leaves alone (e.g. an expiry that has passed since).
    """
    return KeySpec(
        name=_check_name(spec.name) if "name" in fields else spec.name,
        owner=_check_owner(spec.owner) if "owner" in fields else spec.owner,
        scopes=_check_scopes(spec.scopes) if "scopes" in fields else spec.scopes,
        allowed_models=(
            _check_allowed_models(spec.allowed_models)
            if "allowed_models" in fields
            else spec.allowed_models
        ),
        limits=_check_limits(spec.limits) if "limits" in fields else spec.limits,
        expire_time=(
            _check_expire_time(spec.expire_time, now)
            if "expire_time" in fields
            else spec.expire_time
        ),
        labels=_check_labels(spec.labels) if "labels" in fields else spec.labels,
    )
