"""The embedded store: one SQLite file in WAL mode.

- Every SQLite call runs on one dedicated worker thread holding the only
  connection: the event loop never blocks on disk, the connection is never
  shared between threads.
- `synchronous = FULL`: a write is on disk when its call returns, so a
  SIGKILL (or a power cut) loses no acknowledged write.
- FTS5 external-content tables, kept in step by triggers, give BM25 ranking
  for memories and messages and the `<mark>` highlights of message search.
- Vectors are float32 blobs next to their memory. Vector search is numpy
  brute force over one user's vectors, held in a per-user cache (a
  normalised float32 matrix) that any change of that user's memories drops:
  at 10,000 memories of 768 dimensions a search is a 30 MB matrix-vector
  product, a few milliseconds (see the README for measurements).
"""

# SQL here is built only from fixed fragments and column lists; every value is a
# bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import html
import json
import math
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from marie_kit.sqlite import open_on_thread, probe_write, write_transaction

from marie_memory.records import (
    EVENT_ADD,
    EVENT_DELETE,
    EVENT_UPDATE,
    MESSAGE_EMBEDDING_NOTE,
    Conversation,
    EmbeddingSpace,
    ExtractionJob,
    HistoryEntry,
    Memory,
    MemoryChange,
    MemoryFilter,
    Message,
    MessageHit,
    MessageVector,
    ScoredMemory,
    ToolCall,
)
from marie_memory.stores.contract import FINISHED_JOB_SECONDS
from marie_memory.stores.keywords import (
    MARK_CLOSE,
    MARK_OPEN,
    SNIPPET_CONTEXT,
    fold_in_place,
    highlight_fragments,
    query_words,
)

# 2: the full-text indices hold folded text (keywords.fold_in_place).
# 3: ... and stem English words (FTS5's porter tokenizer): "painting" finds
#    "painted" (on LOCOMO's tuning half keyword R@10 0.659 -> 0.692).
SCHEMA_VERSION = 3
# How both full-text indices split, fold and stem words.
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
_FTS_TRIGGERS = (
    "messages_ai",
    "messages_ad",
    "memories_ai",
    "memories_ad",
    "memories_au",
)
# Users whose vectors stay in memory; each costs 4 bytes x dimension x memories.
VECTOR_CACHE_USERS = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    title         TEXT NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    create_time   REAL NOT NULL,
    update_time   REAL NOT NULL,
    message_count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_create ON conversations (user_id, create_time, id);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations (user_id, update_time, id);
CREATE TABLE IF NOT EXISTS messages (
    seq               INTEGER PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    conversation_id   TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    position          INTEGER NOT NULL,
    role              INTEGER NOT NULL,
    content           TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    create_time       REAL NOT NULL,
    metadata          TEXT NOT NULL,
    name              TEXT NOT NULL,
    tool_calls        TEXT NOT NULL,
    tool_call_id      TEXT NOT NULL,
    vector            BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_position ON messages (conversation_id, position);
CREATE INDEX IF NOT EXISTS messages_by_user ON messages (user_id, seq);
CREATE INDEX IF NOT EXISTS messages_without_vector ON messages (seq) WHERE vector IS NULL;
CREATE TABLE IF NOT EXISTS memories (
    seq                    INTEGER PRIMARY KEY,
    id                     TEXT NOT NULL UNIQUE,
    user_id                TEXT NOT NULL,
    text                   TEXT NOT NULL,
    hash                   TEXT NOT NULL,
    categories             TEXT NOT NULL,
    metadata               TEXT NOT NULL,
    source_conversation_id TEXT NOT NULL,
    source_message_ids     TEXT NOT NULL,
    create_time            REAL NOT NULL,
    update_time            REAL NOT NULL,
    vector                 BLOB
);
CREATE INDEX IF NOT EXISTS memories_by_create ON memories (user_id, create_time, id);
CREATE INDEX IF NOT EXISTS memories_by_hash ON memories (user_id, hash);
CREATE INDEX IF NOT EXISTS memories_without_vector ON memories (seq) WHERE vector IS NULL;
CREATE TABLE IF NOT EXISTS history (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    memory_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    event       INTEGER NOT NULL,
    old_text    TEXT NOT NULL,
    new_text    TEXT NOT NULL,
    create_time REAL NOT NULL,
    actor       TEXT NOT NULL,
    inferred    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_memory ON history (user_id, memory_id, seq);
CREATE TABLE IF NOT EXISTS extraction_jobs (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    payload           TEXT NOT NULL,
    attempts          INTEGER NOT NULL,
    next_attempt_time REAL NOT NULL,
    create_time       REAL NOT NULL,
    last_error        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS extraction_jobs_due ON extraction_jobs (next_attempt_time);
CREATE INDEX IF NOT EXISTS extraction_jobs_by_user ON extraction_jobs (user_id);
CREATE TABLE IF NOT EXISTS finished_jobs (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    attempts       INTEGER NOT NULL,
    create_time    REAL NOT NULL,
    finish_time    REAL NOT NULL,
    state          INTEGER NOT NULL,
    failure_reason TEXT NOT NULL,
    last_error     TEXT NOT NULL,
    results        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS finished_jobs_by_time ON finished_jobs (finish_time);
CREATE INDEX IF NOT EXISTS finished_jobs_by_user ON finished_jobs (user_id);
"""

# The full-text indices (FTS5 external-content tables) and the triggers that
# keep them in step with their tables, indexing folded text.
_FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
    content, content='messages', content_rowid='seq', tokenize='{FTS_TOKENIZER}'
);
CREATE TRIGGER IF NOT EXISTS messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.seq, marie_fold(new.content));
END;
CREATE TRIGGER IF NOT EXISTS messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content)
    VALUES ('delete', old.seq, marie_fold(old.content));
END;
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
    text, content='memories', content_rowid='seq', tokenize='{FTS_TOKENIZER}'
);
CREATE TRIGGER IF NOT EXISTS memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, text) VALUES (new.seq, marie_fold(new.text));
END;
CREATE TRIGGER IF NOT EXISTS memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text)
    VALUES ('delete', old.seq, marie_fold(old.text));
END;
CREATE TRIGGER IF NOT EXISTS memories_au AFTER UPDATE OF text ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text)
    VALUES ('delete', old.seq, marie_fold(old.text));
    INSERT INTO memories_fts (rowid, text) VALUES (new.seq, marie_fold(new.text));
END;
"""
_SCHEMA += _FTS_SCHEMA


def _statements(script: str) -> list[str]:
    """The SQL statements of `script`, one by one (a trigger is one statement)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


_CONVERSATION_COLUMNS = (
    "id, user_id, title, provider, model, metadata, create_time, update_time, message_count"
)
_MESSAGE_COLUMNS = (
    "id, conversation_id, position, role, content, provider, model, prompt_tokens, "
    "completion_tokens, create_time, metadata, name, tool_calls, tool_call_id"
)
_PREFIXED_MESSAGE_COLUMNS = ", ".join("m." + c.strip() for c in _MESSAGE_COLUMNS.split(","))
_MEMORY_COLUMNS = (
    "id, user_id, text, hash, categories, metadata, source_conversation_id, "
    "source_message_ids, create_time, update_time"
)
_HISTORY_COLUMNS = "id, memory_id, event, old_text, new_text, create_time, actor, inferred"
_JOB_COLUMNS = "id, user_id, payload, attempts, next_attempt_time, create_time, last_error"
_FINISHED_COLUMNS = (
    "id, user_id, attempts, create_time, finish_time, state, failure_reason, last_error, results"
)

T = TypeVar("T")
FloatMatrix = npt.NDArray[np.float32]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Files of an older schema get their full-text indices made again, once,
    at start (one transaction: seconds per 100k rows): those of schema 1
    indexed text as it was written, those of schema 2 without stemming. The
    indices and their triggers are dropped, created as `_FTS_SCHEMA` says,
    and filled with every stored text, folded."""
    if version >= SCHEMA_VERSION:
        return
    with write_transaction(db):
        for trigger in _FTS_TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        db.execute("DROP TABLE IF EXISTS messages_fts")
        db.execute("DROP TABLE IF EXISTS memories_fts")
        for statement in _statements(_FTS_SCHEMA):
            db.execute(statement)
        db.execute(
            "INSERT INTO messages_fts (rowid, content) "
            "SELECT seq, marie_fold(content) FROM messages"
        )
        db.execute(
            "INSERT INTO memories_fts (rowid, text) SELECT seq, marie_fold(text) FROM memories"
        )


def _fts_term(word: str) -> str:
    """One word as an FTS5 query (quoted: no query syntax)."""
    return '"' + word.replace('"', '""') + '"'


def fts_query(text: str) -> str:
    """A safe FTS5 query from free text: every word quoted, any of them may match."""
    return " OR ".join(_fts_term(w) for w in query_words(text))


def _bm25_idf(total: int, holding: int) -> float:
    """A term's weight in BM25 as FTS5's bm25() computes it, among `total`
    texts of which `holding` hold it (never below 1e-6)."""
    return max(1e-6, math.log((total - holding + 0.5) / (holding + 0.5)))


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        user_id=row["user_id"],
        title=row["title"],
        provider=row["provider"],
        model=row["model"],
        metadata=json.loads(row["metadata"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        message_count=row["message_count"],
    )


def _message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        position=row["position"],
        role=row["role"],
        content=row["content"],
        provider=row["provider"],
        model=row["model"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        create_time=row["create_time"],
        metadata=json.loads(row["metadata"]),
        name=row["name"],
        tool_calls=tuple(ToolCall(*call) for call in json.loads(row["tool_calls"])),
        tool_call_id=row["tool_call_id"],
    )


def _memory(row: sqlite3.Row) -> Memory:
    return Memory(
        id=row["id"],
        user_id=row["user_id"],
        text=row["text"],
        hash=row["hash"],
        categories=tuple(json.loads(row["categories"])),
        metadata=json.loads(row["metadata"]),
        source_conversation_id=row["source_conversation_id"],
        source_message_ids=tuple(json.loads(row["source_message_ids"])),
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


def _history(row: sqlite3.Row) -> HistoryEntry:
    return HistoryEntry(
        id=row["id"],
        memory_id=row["memory_id"],
        event=row["event"],
        old_text=row["old_text"],
        new_text=row["new_text"],
        create_time=row["create_time"],
        actor=row["actor"],
        inferred=bool(row["inferred"]),
    )


def _job(row: sqlite3.Row) -> ExtractionJob:
    return ExtractionJob(
        id=row["id"],
        user_id=row["user_id"],
        payload=row["payload"],
        attempts=row["attempts"],
        next_attempt_time=row["next_attempt_time"],
        create_time=row["create_time"],
        last_error=row["last_error"],
    )


def _finished_job(row: sqlite3.Row) -> ExtractionJob:
    return ExtractionJob(
        id=row["id"],
        user_id=row["user_id"],
        payload="",
        attempts=row["attempts"],
        next_attempt_time=0.0,
        create_time=row["create_time"],
        last_error=row["last_error"],
        state=row["state"],
        finish_time=row["finish_time"],
        failure_reason=row["failure_reason"],
        results=row["results"],
    )


def _memory_columns(memory: Memory) -> dict[str, Any]:
    return {
        "id": memory.id,
        "user_id": memory.user_id,
        "text": memory.text,
        "hash": memory.hash,
        "categories": _dumps(list(memory.categories)),
        "metadata": _dumps(dict(memory.metadata)),
        "source_conversation_id": memory.source_conversation_id,
        "source_message_ids": _dumps(list(memory.source_message_ids)),
        "create_time": memory.create_time,
        "update_time": memory.update_time,
    }


def _filter_sql(memory_filter: MemoryFilter, params: dict[str, Any]) -> str:
    """AND-ed conditions on `memories` (aliased m) for a filter; params filled in."""
    parts: list[str] = []
    if memory_filter.source_conversation_id:
        parts.append("m.source_conversation_id = :f_source")
        params["f_source"] = memory_filter.source_conversation_id
    if memory_filter.categories:
        params["f_categories"] = _dumps(list(memory_filter.categories))
        parts.append(
            "EXISTS (SELECT 1 FROM json_each(m.categories) c "
            "WHERE c.value IN (SELECT value FROM json_each(:f_categories)))"
        )
    for i, (key, value) in enumerate(sorted(memory_filter.metadata.items())):
        params[f"f_key{i}"] = key
        params[f"f_value{i}"] = value
        parts.append(
            f"EXISTS (SELECT 1 FROM json_each(m.metadata) e "
            f"WHERE e.key = :f_key{i} AND e.value = :f_value{i})"
        )
    return "".join(f" AND {p}" for p in parts)


def _vector_blob(vector: Sequence[float]) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


@dataclass(frozen=True, slots=True)
class _Patch:
    event: int
    seq: int | None
    vector: Sequence[float] | None
    facet: tuple[frozenset[str], dict[str, str], str]


def _unit(vector: Sequence[float]) -> FloatMatrix:
    row = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(row))
    return row / norm if norm else row


@dataclass
class _UserVectors:
    seqs: npt.NDArray[np.int64]  # memories.seq of each row
    matrix: FloatMatrix  # rows L2-normalised
    # What filters look at, per row: (categories, metadata, source conversation).
    facets: list[tuple[frozenset[str], dict[str, str], str]]

    def mask(self, memory_filter: MemoryFilter) -> npt.NDArray[np.bool_]:
        categories = set(memory_filter.categories)
        metadata = list(memory_filter.metadata.items())
        source = memory_filter.source_conversation_id

        def keep(facet: tuple[frozenset[str], dict[str, str], str]) -> bool:
            cats, meta, src = facet
            return (
                (not source or src == source)
                and (not categories or not cats.isdisjoint(categories))
                and all(meta.get(k) == v for k, v in metadata)
            )

        return np.fromiter(map(keep, self.facets), dtype=bool, count=len(self.facets))

    def patch(self, patches: Sequence[_Patch]) -> bool:
        """Applies committed changes; False when the cache must be reloaded instead."""
        rows = {int(s): i for i, s in enumerate(self.seqs)}
        dimension = self.matrix.shape[1] if len(self.seqs) else None
        removed: set[int] = set()
        added: list[tuple[int, FloatMatrix, tuple[frozenset[str], dict[str, str], str]]] = []
        for p in patches:
            if p.seq is None:
                return False
            row = rows.get(p.seq)
            if p.event == EVENT_DELETE:
                if row is not None:
                    removed.add(row)
                continue
            if p.vector is None:
                if row is not None:
                    self.facets[row] = p.facet
                continue
            vector = _unit(p.vector)
            if dimension is not None and vector.shape[0] != dimension:
                return False
            dimension = vector.shape[0]
            if row is None:
                added.append((p.seq, vector, p.facet))
            else:
                self.matrix[row] = vector
                self.facets[row] = p.facet
        if removed:
            keep = [i for i in range(len(self.seqs)) if i not in removed]
            self.seqs = self.seqs[keep]
            self.matrix = self.matrix[keep]
            self.facets = [self.facets[i] for i in keep]
        if added:
            new_rows = np.stack([v for _, v, _ in added])
            seqs = np.asarray([s for s, _, _ in added], dtype=np.int64)
            self.matrix = new_rows if not len(self.seqs) else np.vstack([self.matrix, new_rows])
            self.seqs = np.concatenate([self.seqs, seqs])
            self.facets.extend(f for _, _, f in added)
        return True


class SqliteStore:
    """The `Store` on one SQLite file. Open with `await SqliteStore.open(path)`."""

    #: One process writes the file: its memory adds of a user take turns.
    claims_texts = False

    def __init__(self, path: Path, connection: sqlite3.Connection, executor: ThreadPoolExecutor):
        self.path = path
        self._db = connection
        self._executor = executor
        # Touched only on the worker thread.
        self._vectors: OrderedDict[str, _UserVectors] = OrderedDict()

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int = 0) -> SqliteStore:
        connection, executor = await open_on_thread(
            path,
            _SCHEMA,
            thread_name="marie-memory-sqlite",
            schema_version=SCHEMA_VERSION,
            foreign_keys=True,
            max_bytes=max_bytes,
            functions={"marie_fold": fold_in_place},
            migrate=_migrate,
        )
        return cls(path, connection, executor)

    async def probe_write(self) -> None:
        await self._run(probe_write, self._db)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return write_transaction(self._db)

    async def close(self) -> None:
        def _close() -> None:
            self._db.close()

        await self._run(_close)
        self._executor.shutdown(wait=True)

    # --- embedding space --------------------------------------------------

    def _get_space(self) -> EmbeddingSpace | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'embedding_space'").fetchone()
        if row is None:
            return None
        value = json.loads(row["value"])
        return EmbeddingSpace(model=value["model"], dimension=int(value["dimension"]))

    async def get_embedding_space(self) -> EmbeddingSpace | None:
        return await self._run(self._get_space)

    def _set_space(self, space: EmbeddingSpace | None) -> None:
        with self._transaction():
            if space != self._get_space():
                self._db.execute("UPDATE memories SET vector = NULL WHERE vector IS NOT NULL")
                self._db.execute("UPDATE messages SET vector = NULL WHERE vector IS NOT NULL")
            if space is None:
                self._db.execute("DELETE FROM meta WHERE key = 'embedding_space'")
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('embedding_space', ?)",
                    (_dumps({"model": space.model, "dimension": space.dimension}),),
                )
        self._vectors.clear()

    async def set_embedding_space(self, space: EmbeddingSpace | None) -> None:
        await self._run(self._set_space, space)

    async def memories_without_vectors(self, limit: int) -> list[Memory]:
        def _select() -> list[Memory]:
            rows = self._db.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE vector IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            return [_memory(r) for r in rows]

        return await self._run(_select)

    async def set_vectors(self, vectors: Sequence[tuple[str, str, Sequence[float]]]) -> None:
        def _set() -> None:
            with self._transaction():
                self._db.executemany(
                    "UPDATE memories SET vector = ? WHERE id = ? AND user_id = ?",
                    [(_vector_blob(v), memory_id, user) for user, memory_id, v in vectors],
                )
            for user, _, _ in vectors:
                self._vectors.pop(user, None)

        await self._run(_set)

    async def messages_without_vectors(self, limit: int) -> list[tuple[str, Message]]:
        def _select() -> list[tuple[str, Message]]:
            rows = self._db.execute(
                f"SELECT user_id, {_MESSAGE_COLUMNS} FROM messages WHERE vector IS NULL "
                "AND content != '' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            return [(r["user_id"], _message(r)) for r in rows]

        return await self._run(_select)

    async def set_message_vectors(self, vectors: Sequence[MessageVector]) -> None:
        # A message that gets no vector holds an empty blob: not NULL (so it is
        # not handed out again), and skipped by vector search.
        def _set() -> None:
            with self._transaction():
                self._db.executemany(
                    "UPDATE messages SET vector = ? WHERE id = ? AND user_id = ?",
                    [
                        (
                            _vector_blob(v.vector) if v.vector is not None else b"",
                            v.message_id,
                            v.user_id,
                        )
                        for v in vectors
                    ],
                )
                self._db.executemany(
                    "UPDATE messages SET metadata = json_set(metadata, ?, ?) "
                    "WHERE id = ? AND user_id = ?",
                    [
                        (f"$.{MESSAGE_EMBEDDING_NOTE}", v.note, v.message_id, v.user_id)
                        for v in vectors
                        if v.note
                    ],
                )

        await self._run(_set)

    async def vector_search_messages(
        self,
        user_id: str,
        vector: Sequence[float],
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        query = _unit(vector)
        sql = (
            "SELECT seq, vector FROM messages WHERE user_id = :user AND vector IS NOT NULL "
            "AND length(vector) > 0"
        )
        params: dict[str, Any] = {"user": user_id}
        if conversation_id:
            sql += " AND conversation_id = :conv"
            params["conv"] = conversation_id
        if roles:
            params["roles"] = _dumps(list(roles))
            sql += " AND role IN (SELECT value FROM json_each(:roles))"

        def _search() -> list[MessageHit]:
            rows = self._db.execute(sql, params).fetchall()
            rows = [r for r in rows if len(r[1]) == 4 * query.shape[0]]
            if not rows:
                return []
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            matrix = matrix.reshape(len(rows), -1)
            norms = np.linalg.norm(matrix, axis=1)
            scores = (matrix @ query) / np.where(norms == 0, 1, norms)
            top = np.argsort(-scores, kind="stable")[:limit]
            seqs = [int(rows[i][0]) for i in top]
            found = self._db.execute(
                f"SELECT m.seq, {_PREFIXED_MESSAGE_COLUMNS}, "
                "c.title AS conversation_title FROM messages m "
                "JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.seq IN (SELECT value FROM json_each(?))",
                (_dumps(seqs),),
            ).fetchall()
            by_seq = {int(r["seq"]): r for r in found}
            return [
                MessageHit(
                    message=_message(by_seq[seq]),
                    conversation_title=by_seq[seq]["conversation_title"],
                    relevance=float(scores[i]),
                    snippets=[html.escape(by_seq[seq]["content"][: 2 * SNIPPET_CONTEXT])],
                )
                for i, seq in zip(top, seqs, strict=True)
                if seq in by_seq
            ]

        return await self._run(_search)

    # --- conversations ----------------------------------------------------

    async def create_conversation(self, conversation: Conversation) -> Conversation:
        def _insert() -> Conversation:
            c = conversation
            with self._transaction():
                # An id that exists already is a retried create (ids from a
                # request id): the stored conversation is the answer.
                self._db.execute(
                    f"INSERT OR IGNORE INTO conversations ({_CONVERSATION_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        c.id,
                        c.user_id,
                        c.title,
                        c.provider,
                        c.model,
                        _dumps(dict(c.metadata)),
                        c.create_time,
                        c.update_time,
                        c.message_count,
                    ),
                )
                stored = self._get_conversation(c.user_id, c.id)
            if stored is None:
                raise ValueError(f"conversation {c.id} belongs to another user")
            return stored

        return await self._run(_insert)

    def _get_conversation(self, user_id: str, conversation_id: str) -> Conversation | None:
        row = self._db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND user_id = ?",
            (conversation_id, user_id),
        ).fetchone()
        return None if row is None else _conversation(row)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation | None:
        return await self._run(self._get_conversation, user_id, conversation_id)

    async def list_conversations(
        self, user_id: str, order_by_update: bool, after: tuple[float, str] | None, limit: int
    ) -> list[Conversation]:
        column = "update_time" if order_by_update else "create_time"
        sql = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = :user"
        params: dict[str, Any] = {"user": user_id, "limit": limit}
        if after is not None:
            sql += f" AND ({column} < :t OR ({column} = :t AND id < :id))"
            params.update(t=after[0], id=after[1])
        sql += f" ORDER BY {column} DESC, id DESC LIMIT :limit"

        def _select() -> list[Conversation]:
            return [_conversation(r) for r in self._db.execute(sql, params).fetchall()]

        return await self._run(_select)

    async def update_conversation(
        self, user_id: str, conversation_id: str, changes: Mapping[str, object], update_time: float
    ) -> Conversation | None:
        allowed = {"title", "provider", "model", "metadata"}
        assignments = []
        params: dict[str, Any] = {"id": conversation_id, "user": user_id, "now": update_time}
        for name, value in changes.items():
            if name not in allowed:
                raise ValueError(f"cannot change {name}")
            assignments.append(f"{name} = :{name}")
            params[name] = _dumps(value) if name == "metadata" else value
        sets = ", ".join([*assignments, "update_time = :now"])

        def _update() -> Conversation | None:
            with self._transaction():
                self._db.execute(
                    f"UPDATE conversations SET {sets} WHERE id = :id AND user_id = :user", params
                )
                return self._get_conversation(user_id, conversation_id)

        return await self._run(_update)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> int | None:
        def _delete() -> int | None:
            with self._transaction():
                deleted = self._db.execute(
                    "DELETE FROM conversations WHERE id = ? AND user_id = ?",
                    (conversation_id, user_id),
                ).rowcount
                if not deleted:
                    return None
                return self._db.execute(
                    "DELETE FROM messages WHERE conversation_id = ? AND user_id = ?",
                    (conversation_id, user_id),
                ).rowcount

        return await self._run(_delete)

    # --- messages ---------------------------------------------------------

    async def append_messages(
        self,
        user_id: str,
        conversation_id: str,
        messages: Sequence[Message],
        now: float,
        request_id: str = "",
    ) -> tuple[list[Message], Conversation] | None:
        def _append() -> tuple[list[Message], Conversation] | None:
            with self._transaction():
                conversation = self._get_conversation(user_id, conversation_id)
                if conversation is None:
                    return None
                if request_id:
                    # Ids derive from the request id: stored ids mean a retried call.
                    ids = [m.id for m in messages]
                    marks = ", ".join("?" * len(ids))
                    rows = self._db.execute(
                        f"SELECT {_MESSAGE_COLUMNS} FROM messages "
                        f"WHERE conversation_id = ? AND id IN ({marks}) ORDER BY position",
                        (conversation_id, *ids),
                    ).fetchall()
                    if rows:
                        return [_message(r) for r in rows], conversation
                stored = []
                for offset, m in enumerate(messages):
                    position = conversation.message_count + offset
                    self._db.execute(
                        f"INSERT INTO messages (user_id, {_MESSAGE_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            user_id,
                            m.id,
                            conversation_id,
                            position,
                            m.role,
                            m.content,
                            m.provider,
                            m.model,
                            m.prompt_tokens,
                            m.completion_tokens,
                            now,
                            _dumps(dict(m.metadata)),
                            m.name,
                            _dumps([[c.id, c.function_name, c.arguments] for c in m.tool_calls]),
                            m.tool_call_id,
                        ),
                    )
                    stored.append(m.stored(conversation_id, position, now))
                self._db.execute(
                    "UPDATE conversations SET message_count = message_count + ?, "
                    "update_time = ? WHERE id = ?",
                    (len(messages), now, conversation_id),
                )
                updated = self._get_conversation(user_id, conversation_id)
                assert updated is not None
                return stored, updated

        return await self._run(_append)

    async def list_messages(
        self, user_id: str, conversation_id: str, descending: bool, after: int | None, limit: int
    ) -> list[Message] | None:
        order = "DESC" if descending else "ASC"
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = :conv"
        params: dict[str, Any] = {"conv": conversation_id, "limit": limit}
        if after is not None:
            sql += " AND position " + ("<" if descending else ">") + " :after"
            params["after"] = after
        sql += f" ORDER BY position {order} LIMIT :limit"

        def _select() -> list[Message] | None:
            if self._get_conversation(user_id, conversation_id) is None:
                return None
            return [_message(r) for r in self._db.execute(sql, params).fetchall()]

        return await self._run(_select)

    async def search_messages(
        self,
        user_id: str,
        query: str,
        conversation_id: str,
        roles: Sequence[int],
        limit: int,
    ) -> list[MessageHit]:
        match = fts_query(query)
        if not match:
            return []
        columns = ", ".join(f"m.{c.strip()}" for c in _MESSAGE_COLUMNS.split(","))
        sql = (
            f"SELECT {columns}, c.title AS conversation_title, bm25(messages_fts) AS rank, "
            f"highlight(messages_fts, 0, '{MARK_OPEN}', '{MARK_CLOSE}') AS marked "
            "FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE messages_fts MATCH :match AND m.user_id = :user"
        )
        params: dict[str, Any] = {"match": match, "user": user_id, "limit": limit}
        if conversation_id:
            sql += " AND m.conversation_id = :conv"
            params["conv"] = conversation_id
        if roles:
            params["roles"] = _dumps(list(roles))
            sql += " AND m.role IN (SELECT value FROM json_each(:roles))"
        sql += " ORDER BY rank, m.seq LIMIT :limit"

        def _select() -> list[MessageHit]:
            return [
                MessageHit(
                    message=_message(r),
                    conversation_title=r["conversation_title"],
                    relevance=-float(r["rank"]),
                    snippets=highlight_fragments(r["marked"]),
                )
                for r in self._db.execute(sql, params).fetchall()
            ]

        return await self._run(_select)

    # --- memories ---------------------------------------------------------

    def _get_memory(self, user_id: str, memory_id: str) -> Memory | None:
        row = self._db.execute(
            f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE id = ? AND user_id = ?",
            (memory_id, user_id),
        ).fetchone()
        return None if row is None else _memory(row)

    async def get_memory(self, user_id: str, memory_id: str) -> Memory | None:
        return await self._run(self._get_memory, user_id, memory_id)

    async def find_memory_by_hash(self, user_id: str, text_hash: str) -> Memory | None:
        def _select() -> Memory | None:
            row = self._db.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE user_id = ? AND hash = ? "
                "ORDER BY create_time LIMIT 1",
                (user_id, text_hash),
            ).fetchone()
            return None if row is None else _memory(row)

        return await self._run(_select)

    async def list_memories(
        self,
        user_id: str,
        memory_filter: MemoryFilter,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[Memory]:
        params: dict[str, Any] = {"user": user_id, "limit": limit}
        sql = f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE m.user_id = :user"
        sql += _filter_sql(memory_filter, params)
        if after is not None:
            sql += " AND (m.create_time < :t OR (m.create_time = :t AND m.id < :id))"
            params.update(t=after[0], id=after[1])
        sql += " ORDER BY m.create_time DESC, m.id DESC LIMIT :limit"

        def _select() -> list[Memory]:
            return [_memory(r) for r in self._db.execute(sql, params).fetchall()]

        return await self._run(_select)

    def _insert_history(self, user_id: str, entry: HistoryEntry) -> None:
        self._db.execute(
            f"INSERT INTO history (user_id, {_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                user_id,
                entry.id,
                entry.memory_id,
                entry.event,
                entry.old_text,
                entry.new_text,
                entry.create_time,
                entry.actor,
                int(entry.inferred),
            ),
        )

    async def apply_memory_changes(self, user_id: str, changes: Sequence[MemoryChange]) -> None:
        def _apply() -> None:
            patches: list[_Patch] = []
            with self._transaction():
                for change in changes:
                    patches.append(self._apply_one(user_id, change))
            self._patch_vectors(user_id, patches)

        await self._run(_apply)

    def _seq_of(self, memory_id: str, user_id: str) -> int | None:
        row = self._db.execute(
            "SELECT seq FROM memories WHERE id = ? AND user_id = ?", (memory_id, user_id)
        ).fetchone()
        return None if row is None else int(row[0])

    def _apply_one(self, user_id: str, change: MemoryChange) -> _Patch:
        memory = change.memory
        if memory.user_id != user_id:
            raise ValueError("a change names another user's memory")
        columns = _memory_columns(memory)
        seq: int | None = None
        if change.event == EVENT_ADD:
            columns["vector"] = None if change.vector is None else _vector_blob(change.vector)
            names = ", ".join(columns)
            values = ", ".join(f":{n}" for n in columns)
            cursor = self._db.execute(f"INSERT INTO memories ({names}) VALUES ({values})", columns)
            seq = cursor.lastrowid
        elif change.event == EVENT_UPDATE:
            sets = ", ".join(f"{n} = :{n}" for n in columns if n not in ("id", "user_id"))
            if change.vector is not None:
                sets += ", vector = :vector"
                columns["vector"] = _vector_blob(change.vector)
            seq = self._seq_of(memory.id, user_id)
            self._db.execute(
                f"UPDATE memories SET {sets} WHERE id = :id AND user_id = :user_id", columns
            )
        elif change.event == EVENT_DELETE:
            seq = self._seq_of(memory.id, user_id)
            self._db.execute(
                "DELETE FROM memories WHERE id = ? AND user_id = ?", (memory.id, user_id)
            )
            if change.erase_history:
                self._db.execute(
                    "DELETE FROM history WHERE memory_id = ? AND user_id = ?",
                    (memory.id, user_id),
                )
        if change.history is not None:
            self._insert_history(user_id, change.history)
        facet = (frozenset(memory.categories), dict(memory.metadata), memory.source_conversation_id)
        return _Patch(change.event, seq, change.vector, facet)

    def _patch_vectors(self, user_id: str, patches: Sequence[_Patch]) -> None:
        """Brings a cached user matrix up to date in place of reloading it: a reload
        reads every vector of the user (hundreds of ms at 10k memories)."""
        cached = self._vectors.get(user_id)
        if cached is None:
            return
        if not cached.patch(patches):
            self._vectors.pop(user_id, None)

    async def delete_all_memories(self, user_id: str) -> int:
        def _delete() -> int:
            with self._transaction():
                count = self._db.execute(
                    "DELETE FROM memories WHERE user_id = ?", (user_id,)
                ).rowcount
                self._db.execute("DELETE FROM history WHERE user_id = ?", (user_id,))
                self._db.execute("DELETE FROM extraction_jobs WHERE user_id = ?", (user_id,))
                self._db.execute("DELETE FROM finished_jobs WHERE user_id = ?", (user_id,))
            self._vectors.pop(user_id, None)
            return int(count)

        return await self._run(_delete)

    async def history(
        self, user_id: str, memory_id: str, after: int | None, limit: int
    ) -> list[tuple[int, HistoryEntry]] | None:
        def _select() -> list[tuple[int, HistoryEntry]] | None:
            rows = self._db.execute(
                f"SELECT seq, {_HISTORY_COLUMNS} FROM history WHERE user_id = ? AND memory_id = ? "
                "AND seq > ? ORDER BY seq LIMIT ?",
                (user_id, memory_id, after if after is not None else -1, limit),
            ).fetchall()
            if not rows and after is None and self._get_memory(user_id, memory_id) is None:
                return None
            return [(int(r["seq"]), _history(r)) for r in rows]

        return await self._run(_select)

    async def keyword_search_memories(
        self, user_id: str, query: str, memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        """BM25 with the user's own statistics (`_user_bm25`), best first."""
        terms = [_fts_term(word) for word in dict.fromkeys(query_words(query))]
        if not terms:
            return []

        def _select() -> list[ScoredMemory]:
            scores = self._user_bm25(user_id, terms)
            if scores and not memory_filter.is_empty():
                params: dict[str, Any] = {"seqs": _dumps(list(scores))}
                kept = self._db.execute(
                    "SELECT m.seq FROM memories m "
                    "WHERE m.seq IN (SELECT value FROM json_each(:seqs))"
                    + _filter_sql(memory_filter, params),
                    params,
                )
                scores = {int(r[0]): scores[int(r[0])] for r in kept}
            ranked = heapq.nsmallest(limit, scores.items(), key=lambda item: (-item[1], item[0]))
            found = self._memories_by_seq([seq for seq, _ in ranked])
            return [ScoredMemory(found[seq], score) for seq, score in ranked if seq in found]

        return await self._run(_select)

    def _user_bm25(self, user_id: str, terms: Sequence[str]) -> dict[int, float]:
        """Each of the user's memories holding a term, with its BM25 score as if
        the user's memories were the whole collection: FTS5's bm25() weighs a
        term by its rarity among every user's memories, so a word that
        nearly all of one user's memories hold (their name: LOCOMO's turns
        start with the speaker's) counted as rare, and drowned the words that
        tell the user's memories apart (LOCOMO's tuning half: hybrid R@5/R@10
        0.615/0.703 -> 0.645/0.730). One query per term: its FTS5 score is
        that term's rarity among all memories times how well it matches the
        memory; the rarity is exchanged for the one among the user's."""
        count = self._db.execute("SELECT count(*) FROM memories WHERE user_id = ?", (user_id,))
        user_total = int(count.fetchone()[0])
        total = int(self._db.execute("SELECT count(*) FROM memories").fetchone()[0])
        scores: dict[int, float] = {}
        for term in terms:
            # CROSS JOIN: the term's matches first, then their users (SQLite
            # would otherwise walk the user's memories and match each one).
            rows = self._db.execute(
                "SELECT m.seq, f.rank FROM memories_fts f CROSS JOIN memories m "
                "ON m.seq = f.rowid WHERE memories_fts MATCH ? AND m.user_id = ?",
                (term, user_id),
            ).fetchall()
            if not rows:
                continue
            everywhere = self._db.execute(
                "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?", (term,)
            ).fetchone()[0]
            ratio = _bm25_idf(user_total, len(rows)) / _bm25_idf(total, int(everywhere))
            for seq, rank in rows:
                scores[int(seq)] = scores.get(int(seq), 0.0) - float(rank) * ratio
        return scores

    def _user_vectors(self, user_id: str) -> _UserVectors:
        cached = self._vectors.get(user_id)
        if cached is not None:
            self._vectors.move_to_end(user_id)
            return cached
        rows = self._db.execute(
            "SELECT seq, vector, categories, metadata, source_conversation_id FROM memories "
            "WHERE user_id = ? AND vector IS NOT NULL",
            (user_id,),
        ).fetchall()
        facets = [(frozenset(json.loads(r[2])), json.loads(r[3]), r[4]) for r in rows]
        seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if rows:
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            matrix = matrix.reshape(len(rows), -1).copy()
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix /= np.where(norms == 0, 1, norms)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
        loaded = _UserVectors(seqs, matrix, facets)
        self._vectors[user_id] = loaded
        while len(self._vectors) > VECTOR_CACHE_USERS:
            self._vectors.popitem(last=False)
        return loaded

    def _memories_by_seq(self, seqs: Sequence[int]) -> dict[int, Memory]:
        rows = self._db.execute(
            f"SELECT seq, {_MEMORY_COLUMNS} FROM memories "
            "WHERE seq IN (SELECT value FROM json_each(?))",
            (_dumps([int(s) for s in seqs]),),
        ).fetchall()
        return {int(r["seq"]): _memory(r) for r in rows}

    async def hybrid_search_memories(
        self,
        user_id: str,
        query: str,
        vector: Sequence[float],
        memory_filter: MemoryFilter,
        limit: int,
    ) -> list[ScoredMemory] | None:
        return None  # combined by the service from the two searches below

    async def vector_search_memories(
        self, user_id: str, vector: Sequence[float], memory_filter: MemoryFilter, limit: int
    ) -> list[ScoredMemory]:
        query = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(query))
        if norm:
            query /= norm

        def _search() -> list[ScoredMemory]:
            loaded = self._user_vectors(user_id)
            if not len(loaded.seqs) or loaded.matrix.shape[1] != query.shape[0]:
                return []
            scores = loaded.matrix @ query
            if not memory_filter.is_empty():
                keep = loaded.mask(memory_filter)
                scores = np.where(keep, scores, -np.inf)
            k = min(limit, len(scores))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            top = top[scores[top] != -np.inf]
            found = self._memories_by_seq([int(loaded.seqs[i]) for i in top])
            return [
                ScoredMemory(found[int(loaded.seqs[i])], float(scores[i]))
                for i in top
                if int(loaded.seqs[i]) in found
            ]

        return await self._run(_search)

    # --- extraction queue -------------------------------------------------

    async def enqueue_job(self, job: ExtractionJob) -> None:
        def _insert() -> None:
            # A retried call's job (its id derives from the request id) that
            # ran already is not queued again.
            if self._db.execute("SELECT 1 FROM finished_jobs WHERE id = ?", (job.id,)).fetchone():
                return
            self._db.execute(
                f"INSERT OR IGNORE INTO extraction_jobs ({_JOB_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.user_id,
                    job.payload,
                    job.attempts,
                    job.next_attempt_time,
                    job.create_time,
                    job.last_error,
                ),
            )

        await self._run(_insert)

    async def due_jobs(self, now: float, limit: int) -> list[ExtractionJob]:
        def _select() -> list[ExtractionJob]:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM extraction_jobs WHERE next_attempt_time <= ? "
                "ORDER BY next_attempt_time, create_time LIMIT ?",
                (now, limit),
            ).fetchall()
            return [_job(r) for r in rows]

        return await self._run(_select)

    async def get_job(self, user_id: str, job_id: str) -> ExtractionJob | None:
        def _select() -> ExtractionJob | None:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM extraction_jobs WHERE id = ? AND user_id = ?",
                (job_id, user_id),
            ).fetchone()
            if row is not None:
                return _job(row)
            row = self._db.execute(
                f"SELECT {_FINISHED_COLUMNS} FROM finished_jobs WHERE id = ? AND user_id = ?",
                (job_id, user_id),
            ).fetchone()
            return None if row is None else _finished_job(row)

        return await self._run(_select)

    async def finish_job(
        self,
        job_id: str,
        *,
        state: int,
        finish_time: float,
        reason: str = "",
        error: str = "",
        results: str = "",
    ) -> None:
        def _finish() -> None:
            with self._transaction():
                row = self._db.execute(
                    "SELECT user_id, attempts, create_time FROM extraction_jobs WHERE id = ?",
                    (job_id,),
                ).fetchone()
                if row is None:
                    return
                self._db.execute("DELETE FROM extraction_jobs WHERE id = ?", (job_id,))
                self._db.execute(
                    f"INSERT OR REPLACE INTO finished_jobs ({_FINISHED_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        row["user_id"],
                        row["attempts"] + 1,
                        row["create_time"],
                        finish_time,
                        state,
                        reason,
                        error[:1000],
                        results,
                    ),
                )
                self._db.execute(
                    "DELETE FROM finished_jobs WHERE finish_time < ?",
                    (finish_time - FINISHED_JOB_SECONDS,),
                )

        await self._run(_finish)

    async def take_job(self, job_id: str, now: float, lease_seconds: float) -> bool:
        cursor = await self._run(
            lambda: self._db.execute(
                "UPDATE extraction_jobs SET next_attempt_time = ? "
                "WHERE id = ? AND next_attempt_time <= ?",
                (now + lease_seconds, job_id, now),
            )
        )
        return bool(cursor.rowcount == 1)

    async def retry_job(self, job_id: str, next_attempt_time: float, error: str) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE extraction_jobs SET attempts = attempts + 1, next_attempt_time = ?, "
                "last_error = ? WHERE id = ?",
                (next_attempt_time, error[:1000], job_id),
            )
        )

    async def count_jobs(self) -> int:
        row = await self._run(
            lambda: self._db.execute("SELECT COUNT(*) FROM extraction_jobs").fetchone()
        )
        return int(row[0])

    async def oldest_job_time(self) -> float | None:
        row = await self._run(
            lambda: self._db.execute("SELECT MIN(create_time) FROM extraction_jobs").fetchone()
        )
        return None if row[0] is None else float(row[0])
