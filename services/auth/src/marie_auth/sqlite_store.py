"""The embedded key store: one SQLite file (WAL mode), one table of keys.

Every SQLite call runs on one dedicated worker thread holding the only
connection, so the event loop never blocks on disk and the connection is
never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from marie_kit.sqlite import open_on_thread, probe_write, write_transaction

from marie_auth.store import InvalidPageToken, KeyLimits, KeyPage, KeyRecord, KeySpec, KeyState

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    owner          TEXT NOT NULL,
    digest         TEXT NOT NULL,
    display        TEXT NOT NULL,
    scopes         TEXT NOT NULL,  -- JSON array of strings
    allowed_models TEXT NOT NULL,  -- JSON array of strings
    limits         TEXT NOT NULL,  -- JSON object
    labels         TEXT NOT NULL,  -- JSON object
    state          TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
    create_time    REAL NOT NULL,
    update_time    REAL NOT NULL,
    expire_time    REAL,
    revoke_time    REAL,
    last_used_time REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_digest ON api_keys (digest);
CREATE INDEX IF NOT EXISTS api_keys_owner_created ON api_keys (owner, create_time, id);
CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (create_time, id);
CREATE INDEX IF NOT EXISTS api_keys_expiring ON api_keys (expire_time)
    WHERE expire_time IS NOT NULL AND state = 'active';
-- Key events (revocations, updates) in commit order, read by every auth
-- replica that shares this file; pruned after EVENT_RETENTION_SECONDS.
CREATE TABLE IF NOT EXISTS key_events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    type   TEXT NOT NULL,
    key_id TEXT NOT NULL,
    time   REAL NOT NULL
);
"""

# Every statement is a literal; only `list_page` joins fixed fragments into its WHERE.
# last_used_time is written by _TOUCH alone, so no other write can move it backwards.
_SELECT = (
    "SELECT id, name, owner, digest, display, scopes, allowed_models, limits, labels, state, "
    "create_time, update_time, expire_time, revoke_time, last_used_time FROM api_keys "
)
_SELECT_BY_ID = _SELECT + "WHERE id = :id"
_SELECT_BY_DIGEST = _SELECT + "WHERE digest = :digest"
_INSERT = (
    "INSERT INTO api_keys (id, name, owner, digest, display, scopes, allowed_models, limits, "
    "labels, state, create_time, update_time, expire_time, revoke_time, last_used_time) "
    "VALUES (:id, :name, :owner, :digest, :display, :scopes, :allowed_models, :limits, "
    ":labels, :state, :create_time, :update_time, :expire_time, :revoke_time, :last_used_time)"
)
_UPDATE_SPEC = (
    "UPDATE api_keys SET name = :name, owner = :owner, scopes = :scopes, "
    "allowed_models = :allowed_models, limits = :limits, labels = :labels, "
    "expire_time = :expire_time, update_time = :update_time WHERE id = :id"
)
_SAVE = (
    "UPDATE api_keys SET name = :name, owner = :owner, scopes = :scopes, "
    "allowed_models = :allowed_models, limits = :limits, labels = :labels, "
    "expire_time = :expire_time, state = :state, update_time = :update_time, "
    "revoke_time = :revoke_time WHERE id = :id"
)
_REVOKE = (
    "UPDATE api_keys SET state = 'revoked', revoke_time = :at, update_time = :at "
    "WHERE id = :id AND state = 'active'"
)
_TOUCH = (
    "UPDATE api_keys SET last_used_time = :at "
    "WHERE id = :id AND (last_used_time IS NULL OR last_used_time < :at)"
)
_EXPIRING = (
    "SELECT id FROM api_keys WHERE expire_time IS NOT NULL AND state = 'active' "
    "AND expire_time > :after AND expire_time <= :until ORDER BY expire_time"
)

_APPEND_EVENT = "INSERT INTO key_events (type, key_id, time) VALUES (:type, :key_id, :time)"
_EVENTS_AFTER = (
    "SELECT seq, type, key_id, time FROM key_events WHERE seq > :after ORDER BY seq LIMIT :limit"
)
_LAST_EVENT = "SELECT COALESCE(MAX(seq), 0) FROM key_events"
_PRUNE_EVENTS = "DELETE FROM key_events WHERE time < :before"

T = TypeVar("T")


def encode_page_token(create_time: float, key_id: str) -> str:
    """An opaque keyset cursor: the (create_time, id) of the last key on a page."""
    raw = json.dumps([create_time, key_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[float, str]:
    """The cursor inside a token from `encode_page_token`; InvalidPageToken otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPageToken("malformed page token") from exc
    match value:
        case [float() | int() as create_time, str() as key_id] if not isinstance(create_time, bool):
            return float(create_time), key_id
    raise InvalidPageToken("malformed page token")


def _spec_from_row(row: sqlite3.Row) -> KeySpec:
    limits = json.loads(row["limits"])
    return KeySpec(
        name=row["name"],
        owner=row["owner"],
        scopes=tuple(json.loads(row["scopes"])),
        allowed_models=tuple(json.loads(row["allowed_models"])),
        limits=KeyLimits(
            requests_per_minute=int(limits.get("requests_per_minute", 0)),
            tokens_per_minute=int(limits.get("tokens_per_minute", 0)),
            tokens_per_day=int(limits.get("tokens_per_day", 0)),
            max_concurrent_requests=int(limits.get("max_concurrent_requests", 0)),
        ),
        expire_time=row["expire_time"],
        labels=dict(json.loads(row["labels"])),
    )


def _record_from_row(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        digest=row["digest"],
        display=row["display"],
        spec=_spec_from_row(row),
        state=KeyState(row["state"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        revoke_time=row["revoke_time"],
        last_used_time=row["last_used_time"],
    )


def _spec_columns(spec: KeySpec) -> dict[str, Any]:
    limits = spec.limits
    return {
        "name": spec.name,
        "owner": spec.owner,
        "scopes": json.dumps(list(spec.scopes)),
        "allowed_models": json.dumps(list(spec.allowed_models)),
        "limits": json.dumps(
            {
                "requests_per_minute": limits.requests_per_minute,
                "tokens_per_minute": limits.tokens_per_minute,
                "tokens_per_day": limits.tokens_per_day,
                "max_concurrent_requests": limits.max_concurrent_requests,
            }
        ),
        "labels": json.dumps(dict(spec.labels), sort_keys=True),
        "expire_time": spec.expire_time,
    }


def _record_columns(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "digest": record.digest,
        "display": record.display,
        **_spec_columns(record.spec),
        "state": record.state.value,
        "create_time": record.create_time,
        "update_time": record.update_time,
        "revoke_time": record.revoke_time,
        "last_used_time": record.last_used_time,
    }


class SqliteKeyStore:
    """`KeyStore` on one SQLite file. Open with `await SqliteKeyStore.open(path)`."""

    def __init__(self, path: Path, connection: sqlite3.Connection, executor: ThreadPoolExecutor):
        self.path = path
        self._db = connection
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int = 0) -> SqliteKeyStore:
        """Create the file (and its directory) if needed, migrate, and return the store."""
        connection, executor = await open_on_thread(
            path,
            _SCHEMA,
            thread_name="marie-auth-sqlite",
            schema_version=SCHEMA_VERSION,
            max_bytes=max_bytes,
        )
        return cls(path, connection, executor)

    async def probe_write(self) -> None:
        await self._run(probe_write, self._db)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("key store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- reads ---------------------------------------------------------------

    def _fetch_one(self, sql: str, params: Mapping[str, Any]) -> KeyRecord | None:
        row = self._db.execute(sql, params).fetchone()
        return _record_from_row(row) if row else None

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._run(self._fetch_one, _SELECT_BY_ID, {"id": key_id})

    async def get_by_digest(self, digest: str) -> KeyRecord | None:
        return await self._run(self._fetch_one, _SELECT_BY_DIGEST, {"digest": digest})

    async def list_page(
        self,
        *,
        owner: str | None,
        include_inactive: bool,
        page_size: int,
        page_token: str,
        now: float,
    ) -> KeyPage:
        if page_size < 1:
            raise ValueError("page_size must be positive")
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": page_size + 1, "now": now}
        if owner is not None:
            clauses.append("owner = :owner")
            params["owner"] = owner
        if not include_inactive:
            clauses.append("state = 'active' AND (expire_time IS NULL OR expire_time > :now)")
        if page_token:
            params["after_time"], params["after_id"] = decode_page_token(page_token)
            # A row-value comparison: SQLite walks the (create_time, id) indexes with it.
            clauses.append("(create_time, id) < (:after_time, :after_id)")
        where = " AND ".join(clauses) or "1"
        sql = _SELECT + f"WHERE {where} ORDER BY create_time DESC, id DESC LIMIT :limit"
        rows = await self._run(lambda: self._db.execute(sql, params).fetchall())
        records = [_record_from_row(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        token = encode_page_token(records[-1].create_time, records[-1].id) if more else ""
        return KeyPage(records, token)

    async def ids_expiring(self, after: float, until: float) -> list[str]:
        params = {"after": after, "until": until}
        rows = await self._run(lambda: self._db.execute(_EXPIRING, params).fetchall())
        return [str(row["id"]) for row in rows]

    # -- writes --------------------------------------------------------------

    async def create(self, record: KeyRecord) -> None:
        params = _record_columns(record)
        await self._run(lambda: self._db.execute(_INSERT, params))

    def _update(self, key_id: str, spec: KeySpec, update_time: float) -> KeyRecord | None:
        self._db.execute(
            _UPDATE_SPEC, {**_spec_columns(spec), "update_time": update_time, "id": key_id}
        )
        return self._fetch_one(_SELECT_BY_ID, {"id": key_id})

    async def update(self, key_id: str, spec: KeySpec, update_time: float) -> KeyRecord | None:
        return await self._run(self._update, key_id, spec, update_time)

    def _revoke(self, key_id: str, revoke_time: float) -> KeyRecord | None:
        self._db.execute(_REVOKE, {"id": key_id, "at": revoke_time})
        return self._fetch_one(_SELECT_BY_ID, {"id": key_id})

    async def revoke(self, key_id: str, revoke_time: float) -> KeyRecord | None:
        return await self._run(self._revoke, key_id, revoke_time)

    def _rotate(self, new: KeyRecord, retired: KeyRecord) -> None:
        retired_columns = _record_columns(retired)
        with self._transaction():
            self._db.execute(_INSERT, _record_columns(new))
            self._db.execute(_SAVE, retired_columns)

    async def rotate(self, new: KeyRecord, retired: KeyRecord) -> None:
        await self._run(self._rotate, new, retired)

    async def touch_last_used(self, key_id: str, used_time: float) -> None:
        params = {"id": key_id, "at": used_time}
        await self._run(lambda: self._db.execute(_TOUCH, params))

    # -- the change log ---------------------------------------------------------

    async def append_event(self, event_type: str, key_id: str, at: float) -> int:
        params = {"type": event_type, "key_id": key_id, "time": at}
        cursor = await self._run(lambda: self._db.execute(_APPEND_EVENT, params))
        return int(cursor.lastrowid or 0)

    async def last_event_seq(self) -> int:
        return int(await self._run(lambda: self._db.execute(_LAST_EVENT).fetchone()[0]))

    async def events_after(self, seq: int, limit: int = 1000) -> list[tuple[int, str, str, float]]:
        params = {"after": seq, "limit": limit}
        rows = await self._run(lambda: self._db.execute(_EVENTS_AFTER, params).fetchall())
        return [(int(r["seq"]), str(r["type"]), str(r["key_id"]), float(r["time"])) for r in rows]

    async def prune_events(self, before: float) -> None:
        await self._run(lambda: self._db.execute(_PRUNE_EVENTS, {"before": before}))

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        # The connection is in autocommit mode; this groups statements explicitly.
        return write_transaction(self._db)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._db.close)
        self._closed = True
        self._executor.shutdown(wait=False)
