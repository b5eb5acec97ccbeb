"""Marie's auth service: API-key lifecycle, validation, scopes and per-key limits.

What other code uses:

- `AuthSettings` — `MARIE_AUTH_*` settings;
- `KeyManager`, `open_key_manager` — the core, usable without the gRPC service;
- `KeySpec`, `KeyLimits`, `KeyRecord`, `KeyState` — the domain values;
- `SqliteKeyStore`, `KeyStore` — the store and its interface;
- `AuthComponent` — the service for `marie_kit.server.start_server` / `serve`.
"""

from marie_auth.keys import (
    IssuedKey,
    KeyManager,
    Principal,
    RotatedKey,
    Validation,
    open_key_manager,
    open_store,
)
from marie_auth.service import AuthComponent
from marie_auth.settings import AuthSettings
from marie_auth.sqlite_store import SqliteKeyStore
from marie_auth.store import KeyLimits, KeyPage, KeyRecord, KeySpec, KeyState, KeyStore

__all__ = [
    "AuthComponent",
    "AuthSettings",
    "IssuedKey",
    "KeyLimits",
    "KeyManager",
    "KeyPage",
    "KeyRecord",
    "KeySpec",
    "KeyState",
    "KeyStore",
    "Principal",
    "RotatedKey",
    "SqliteKeyStore",
    "Validation",
    "open_key_manager",
    "open_store",
]
