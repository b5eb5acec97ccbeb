"""The scopes a key may hold, and what an empty scope list means.

| scope         | lets the key …                                              |
|---------------|-------------------------------------------------------------|
| `chat`        | create chat completions                                     |
| `models:read` | list and look up models                                     |
| `embeddings`  | create embeddings                                           |
| `memory`      | read and write conversations and long-term memories         |
| `admin`       | manage API keys (every AuthService RPC but validation)      |

A key created with no scopes gets every scope except `admin`, so admin power
is always asked for by name.
"""

from __future__ import annotations

from collections.abc import Iterable

CHAT = "chat"
MODELS_READ = "models:read"
EMBEDDINGS = "embeddings"
MEMORY = "memory"
ADMIN = "admin"

#: Every scope, in the order they are shown.
KNOWN_SCOPES: tuple[str, ...] = (CHAT, MODELS_READ, EMBEDDINGS, MEMORY, ADMIN)
#: What an empty scope list stands for.
DEFAULT_SCOPES: tuple[str, ...] = tuple(s for s in KNOWN_SCOPES if s != ADMIN)


def unknown_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes in `scopes` that are not in KNOWN_SCOPES."""
    return [s for s in scopes if s not in KNOWN_SCOPES]


def normalize_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scopes without duplicates, in KNOWN_SCOPES order (unknown ones are dropped)."""
    wanted = set(scopes)
    return tuple(s for s in KNOWN_SCOPES if s in wanted)


def effective_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """What a key with these stored scopes may do: DEFAULT_SCOPES when none were given."""
    return normalize_scopes(scopes) or DEFAULT_SCOPES
