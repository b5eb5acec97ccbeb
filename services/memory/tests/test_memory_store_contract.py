"""The store contract: every Store implementation must pass these (see conftest.STORE_OPENERS)."""

from __future__ import annotations

import hashlib
import html
import math
import random
import sqlite3
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from marie_memory.records import (
    EVENT_ADD,
    EVENT_DELETE,
    EVENT_UPDATE,
    JOB_FAILED,
    JOB_SUCCEEDED,
    MESSAGE_EMBEDDING_NOTE,
    ROLE_ASSISTANT,
    ROLE_USER,
    EmbeddingSpace,
    ExtractionJob,
    HistoryEntry,
    MemoryChange,
    MemoryFilter,
    MessageVector,
    ToolCall,
)
from marie_memory.stores.contract import FINISHED_JOB_SECONDS, Store
from marie_memory.stores.sqlite import SqliteStore
from memory_testkit import NO_KNN, add, conversation, memory, message, new_id


def unit(seed: int, dim: int = 16) -> list[float]:
    rng = random.Random(seed)
    v = [rng.gauss(0, 1) for _ in range(dim)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


async def test_conversations_are_created_listed_updated_and_deleted_per_user(store: Store) -> None:
    a = [conversation("alice", f"c{i}", at=100.0 + i) for i in range(5)]
    for c in a:
        await store.create_conversation(c)
    await store.create_conversation(conversation("bob", "theirs", at=200.0))

    assert await store.get_conversation("bob", a[0].id) is None
    assert await store.get_conversation("alice", a[0].id) == a[0]
    page1 = await store.list_conversations("alice", False, None, 3)
    assert [c.title for c in page1] == ["c4", "c3", "c2"]
    last = page1[-1]
    page2 = await store.list_conversations("alice", False, (last.create_time, last.id), 3)
    assert [c.title for c in page2] == ["c1", "c0"]

    assert await store.update_conversation("bob", a[0].id, {"title": "x"}, 300.0) is None
    updated = await store.update_conversation(
        "alice", a[0].id, {"title": "new", "metadata": {"k": "v"}}, 300.0
    )
    assert updated is not None
    assert (updated.title, dict(updated.metadata), updated.update_time) == ("new", {"k": "v"}, 300)
    by_update = await store.list_conversations("alice", True, None, 1)
    assert by_update[0].id == a[0].id

    assert await store.delete_conversation("bob", a[0].id) is None
    assert await store.delete_conversation("alice", a[0].id) == 0
    assert await store.get_conversation("alice", a[0].id) is None
    assert await store.delete_conversation("alice", a[0].id) is None


async def test_messages_append_in_order_page_both_ways_and_go_with_their_conversation(
    store: Store,
) -> None:
    c = conversation("alice", "chat")
    await store.create_conversation(c)
    assert await store.append_messages("bob", c.id, [message(ROLE_USER, "hi")], 5.0) is None
    call = ToolCall("call_1", "lookup", '{"q": 1}')
    first = replace(message(ROLE_ASSISTANT, ""), tool_calls=(call,), metadata={"r": "1"})
    result = await store.append_messages("alice", c.id, [message(ROLE_USER, "hello"), first], 10.0)
    assert result is not None
    stored, conv = result
    assert [m.position for m in stored] == [0, 1]
    assert conv.message_count == 2 and conv.update_time == 10.0
    more = await store.append_messages("alice", c.id, [message(ROLE_USER, "again")], 11.0)
    assert more is not None and more[0][0].position == 2

    listed = await store.list_messages("alice", c.id, False, None, 10)
    assert listed is not None
    assert [m.content for m in listed] == ["hello", "", "again"]
    assert listed[1].tool_calls == (call,) and dict(listed[1].metadata) == {"r": "1"}
    newest = await store.list_messages("alice", c.id, True, None, 2)
    assert newest is not None and [m.position for m in newest] == [2, 1]
    rest = await store.list_messages("alice", c.id, True, 1, 2)
    assert rest is not None and [m.position for m in rest] == [0]
    assert await store.list_messages("bob", c.id, False, None, 10) is None

    assert await store.delete_conversation("alice", c.id) == 3
    assert await store.search_messages("alice", "hello", "", (), 10) == []


async def test_message_search_is_per_user_ranked_and_highlighted(store: Store) -> None:
    mine = conversation("alice", "Trip")
    theirs = conversation("bob", "Other")
    await store.create_conversation(mine)
    await store.create_conversation(theirs)
    await store.append_messages(
        "alice",
        mine.id,
        [
            message(ROLE_USER, "I want to visit <Lisbon> & Porto in May"),
            message(ROLE_ASSISTANT, "Lisbon in May is lovely; Lisbon trams are famous."),
            message(ROLE_USER, "Something unrelated"),
        ],
        1.0,
    )
    await store.append_messages("bob", theirs.id, [message(ROLE_USER, "Lisbon for bob")], 1.0)

    hits = await store.search_messages("alice", "lisbon", "", (), 10)
    assert [h.message.content[:6] for h in hits] == ["Lisbon", "I want"]
    assert all(h.conversation_title == "Trip" for h in hits)
    assert hits[0].relevance >= hits[1].relevance > 0
    assert "<mark>Lisbon</mark>" in hits[0].snippets[0]
    assert hits[1].snippets == ["I want to visit &lt;<mark>Lisbon</mark>&gt; &amp; Porto in May"]
    users = await store.search_messages("alice", "lisbon", "", (ROLE_USER,), 10)
    assert [h.message.role for h in users] == [ROLE_USER]
    assert await store.search_messages("alice", "lisbon", theirs.id, (), 10) == []
    assert await store.search_messages("alice", '"*) OR NOT', "", (), 10) == []


async def test_memories_changes_history_filters_and_paging(store: Store) -> None:
    m1 = memory("alice", "Likes green tea", at=1.0, categories=("food",), metadata={"a": "1"})
    m2 = memory("alice", "Lives in Lisbon", at=2.0, categories=("home",), source="conv_1")
    m3 = memory("alice", "Has a dog", at=3.0, metadata={"a": "2"})
    await store.apply_memory_changes("alice", [add(m1), add(m2), add(m3)])
    await store.apply_memory_changes("bob", [add(memory("bob", "Likes green tea"))])

    assert await store.get_memory("bob", m1.id) is None
    assert await store.get_memory("alice", m1.id) == m1
    assert await store.find_memory_by_hash("alice", m1.hash) == m1
    assert await store.find_memory_by_hash("alice", "0" * 64) is None
    listed = await store.list_memories("alice", MemoryFilter(), None, 2)
    assert [m.id for m in listed] == [m3.id, m2.id]
    tail = await store.list_memories("alice", MemoryFilter(), (m2.create_time, m2.id), 2)
    assert [m.id for m in tail] == [m1.id]
    only = await store.list_memories("alice", MemoryFilter(categories=("food", "x")), None, 10)
    assert [m.id for m in only] == [m1.id]
    meta = await store.list_memories("alice", MemoryFilter(metadata={"a": "2"}), None, 10)
    assert [m.id for m in meta] == [m3.id]
    src = await store.list_memories("alice", MemoryFilter(source_conversation_id="conv_1"), None, 9)
    assert [m.id for m in src] == [m2.id]

    new_text = "Likes black tea"
    changed = replace(m1, text=new_text, hash=hashlib.sha256(new_text.encode()).hexdigest())
    update = HistoryEntry(new_id("h"), m1.id, EVENT_UPDATE, m1.text, new_text, 5.0, "me", True)
    await store.apply_memory_changes("alice", [MemoryChange(EVENT_UPDATE, changed, update)])
    assert await store.get_memory("alice", m1.id) == changed
    assert [
        h.memory.id
        for h in await store.keyword_search_memories("alice", "black", MemoryFilter(), 10)
    ] == [m1.id]
    assert await store.keyword_search_memories("alice", "green", MemoryFilter(), 10) == []

    delete = HistoryEntry(new_id("h"), m1.id, EVENT_DELETE, new_text, "", 6.0, "me", False)
    await store.apply_memory_changes("alice", [MemoryChange(EVENT_DELETE, changed, delete)])
    assert await store.get_memory("alice", m1.id) is None
    history = await store.history("alice", m1.id, None, 10)
    assert history is not None
    assert [(e.event, e.old_text, e.new_text) for _, e in history] == [
        (EVENT_ADD, "", "Likes green tea"),
        (EVENT_UPDATE, "Likes green tea", new_text),
        (EVENT_DELETE, new_text, ""),
    ]
    assert history[1][1].inferred and history[1][1].actor == "me"
    page = await store.history("alice", m1.id, history[0][0], 1)
    assert page is not None and [e.event for _, e in page] == [EVENT_UPDATE]
    assert await store.history("bob", m1.id, None, 10) is None

    erase = MemoryChange(EVENT_DELETE, m2, None, erase_history=True)
    await store.apply_memory_changes("alice", [erase])
    assert await store.history("alice", m2.id, None, 10) is None


async def test_a_failing_change_set_changes_nothing(store: Store) -> None:
    m1 = memory("alice", "one")
    await store.apply_memory_changes("alice", [add(m1)])
    duplicate = add(m1)  # same id: the insert fails
    two = memory("alice", "two")
    with pytest.raises(Exception):  # noqa: B017 - any store error will do
        await store.apply_memory_changes("alice", [add(two), duplicate])
    assert [m.text for m in await store.list_memories("alice", MemoryFilter(), None, 10)] == ["one"]
    # Nor is its history kept.
    assert await store.history("alice", two.id, None, 10) is None


async def test_keyword_search_ranks_by_bm25_with_filters(store: Store) -> None:
    texts = [
        "Allergic to peanuts since early childhood, says the family doctor",
        "Peanuts, peanuts and more peanuts",
        "Plays chess",
    ]
    mems = [memory("alice", t, categories=(f"c{i}",)) for i, t in enumerate(texts)]
    await store.apply_memory_changes("alice", [add(m) for m in mems])
    await store.apply_memory_changes("bob", [add(memory("bob", "peanuts"))])
    hits = await store.keyword_search_memories("alice", "peanuts", MemoryFilter(), 10)
    assert [h.memory.id for h in hits] == [mems[1].id, mems[0].id]
    assert hits[0].score > hits[1].score > 0
    filtered = await store.keyword_search_memories(
        "alice", "peanuts", MemoryFilter(categories=("c0",)), 10
    )
    assert [h.memory.id for h in filtered] == [mems[0].id]


NFC_ZURICH = unicodedata.normalize("NFC", "Zürich")
NFD_ZURICH = unicodedata.normalize("NFD", "Zürich")
FULL_WIDTH_ACME = "\uff21\uff23\uff2d\uff25"
# (stored, query): each pair is the same word to a reader.
FOLDED_PAIRS = [
    (f"Lives in {NFC_ZURICH} now", NFD_ZURICH),
    (f"Lives in {NFD_ZURICH} now", NFC_ZURICH),
    (f"Works at {FULL_WIDTH_ACME} Corp", "acme"),
    ("Works at ACME Corp", FULL_WIDTH_ACME),
    ("Walks down the Stra\u00dfe", "STRASSE"),
    ("Reads \ufb01nance news", "finance"),  # a ligature
]


@pytest.mark.parametrize(("stored", "query"), FOLDED_PAIRS)
async def test_keyword_search_folds_unicode_in_texts_and_queries(
    store: Store, stored: str, query: str
) -> None:
    mem = memory("alice", stored)
    await store.apply_memory_changes("alice", [add(mem)])
    hits = await store.keyword_search_memories("alice", query, MemoryFilter(), 10)
    assert [h.memory.id for h in hits] == [mem.id]
    assert hits[0].memory.text == stored  # what is stored is never changed

    chat = conversation("alice", "t")
    await store.create_conversation(chat)
    await store.append_messages("alice", chat.id, [message(ROLE_USER, stored)], 1.0)
    [hit] = await store.search_messages("alice", query, "", (), 10)
    assert hit.message.content == stored
    # The snippet is the stored text, highlighted where the word is.
    assert hit.snippets and "<mark>" in hit.snippets[0]
    unmarked = hit.snippets[0].replace("<mark>", "").replace("</mark>", "")
    assert unmarked == html.escape(stored)


async def test_vectors_search_per_user_and_follow_the_embedding_space(
    store: Store, emulated: bool
) -> None:
    if emulated:
        pytest.skip(NO_KNN)
    space = EmbeddingSpace("fake/embed", 16)
    await store.set_embedding_space(space)
    assert await store.get_embedding_space() == space
    mems = [
        memory("alice", f"fact {i}", categories=("even" if i % 2 == 0 else "odd",))
        for i in range(20)
    ]
    await store.apply_memory_changes("alice", [add(m, unit(i)) for i, m in enumerate(mems)])
    await store.apply_memory_changes("bob", [add(memory("bob", "x"), unit(3))])

    hits = await store.vector_search_memories("alice", unit(3), MemoryFilter(), 5)
    assert hits[0].memory.id == mems[3].id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 5 and all(h.memory.user_id == "alice" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    even = await store.vector_search_memories(
        "alice", unit(3), MemoryFilter(categories=("even",)), 50
    )
    assert len(even) == 10 and mems[3].id not in {h.memory.id for h in even}

    # An update of the text with a new vector is searched with the new vector at once.
    moved = replace(mems[0], text="moved")
    await store.apply_memory_changes("alice", [MemoryChange(EVENT_UPDATE, moved, None, unit(99))])
    top = await store.vector_search_memories("alice", unit(99), MemoryFilter(), 1)
    assert top[0].memory.text == "moved"

    # A new space drops every vector: nothing mixes two models.
    await store.set_embedding_space(EmbeddingSpace("fake/other", 8))
    assert await store.vector_search_memories("alice", unit(3, 8), MemoryFilter(), 5) == []
    missing = await store.memories_without_vectors(100)
    assert len(missing) == 21
    await store.set_vectors([("alice", mems[5].id, unit(5, 8)), ("bob", mems[6].id, unit(6, 8))])
    again = await store.vector_search_memories("alice", unit(5, 8), MemoryFilter(), 5)
    assert [h.memory.id for h in again] == [mems[5].id]  # bob cannot set alice's vector
    assert len(await store.memories_without_vectors(100)) == 20


async def test_delete_all_memories_erases_everything_of_one_user_only(
    store: Store, emulated: bool
) -> None:
    mine = [memory("alice", f"alice fact {i}") for i in range(3)]
    await store.apply_memory_changes("alice", [add(m, unit(i)) for i, m in enumerate(mine)])
    await store.apply_memory_changes("bob", [add(memory("bob", "bob fact"), unit(9))])
    await store.enqueue_job(ExtractionJob(new_id("job"), "alice", "{}", 0, 0.0, 0.0))
    await store.enqueue_job(ExtractionJob(new_id("job"), "bob", "{}", 0, 0.0, 0.0))

    assert await store.delete_all_memories("alice") == 3
    assert await store.delete_all_memories("alice") == 0
    assert await store.list_memories("alice", MemoryFilter(), None, 10) == []
    assert await store.keyword_search_memories("alice", "fact", MemoryFilter(), 10) == []
    if not emulated:  # osmem-server has no knn query
        assert await store.vector_search_memories("alice", unit(1), MemoryFilter(), 10) == []
    assert await store.history("alice", mine[0].id, None, 10) is None
    assert [j.user_id for j in await store.due_jobs(1.0, 10)] == ["bob"]
    assert len(await store.list_memories("bob", MemoryFilter(), None, 10)) == 1


async def test_the_extraction_queue_delays_retries_and_finishes_jobs(store: Store) -> None:
    first = ExtractionJob(new_id("job"), "alice", '{"n": 1}', 0, 10.0, 1.0)
    later = ExtractionJob(new_id("job"), "alice", '{"n": 2}', 0, 20.0, 2.0)
    assert await store.oldest_job_time() is None
    await store.enqueue_job(later)
    await store.enqueue_job(first)
    assert await store.count_jobs() == 2
    assert await store.oldest_job_time() == 1.0
    assert [j.id for j in await store.due_jobs(15.0, 10)] == [first.id]
    await store.retry_job(first.id, 30.0, "provider down")
    due = await store.due_jobs(25.0, 10)
    assert [j.id for j in due] == [later.id]
    retried = (await store.due_jobs(30.0, 10))[-1]
    assert (retried.id, retried.attempts, retried.last_error) == (first.id, 1, "provider down")
    assert await store.get_job("alice", first.id) == retried
    assert await store.get_job("bob", first.id) is None
    await store.finish_job(
        first.id, state=JOB_FAILED, finish_time=40.0, reason="EXTRACTION_FAILED", error="not JSON"
    )
    assert [j.id for j in await store.due_jobs(100.0, 10)] == [later.id]
    assert await store.count_jobs() == 1
    assert await store.oldest_job_time() == 2.0
    # The outcome stays, for its user only.
    failed = await store.get_job("alice", first.id)
    assert failed is not None
    assert (failed.state, failed.attempts, failed.finish_time, failed.create_time) == (
        JOB_FAILED,
        2,
        40.0,
        1.0,
    )
    assert (failed.failure_reason, failed.last_error) == ("EXTRACTION_FAILED", "not JSON")
    assert await store.get_job("bob", first.id) is None
    await store.finish_job(later.id, state=JOB_SUCCEEDED, finish_time=50.0, results='[{"x": 1}]')
    done = await store.get_job("alice", later.id)
    assert done is not None and (done.state, done.results) == (JOB_SUCCEEDED, '[{"x": 1}]')
    assert await store.count_jobs() == 0
    # Outcomes older than FINISHED_JOB_SECONDS go as later jobs finish.
    last = ExtractionJob(new_id("job"), "alice", "{}", 0, 0.0, 3.0)
    await store.enqueue_job(last)
    await store.finish_job(last.id, state=JOB_SUCCEEDED, finish_time=45.0 + FINISHED_JOB_SECONDS)
    assert await store.get_job("alice", first.id) is None
    assert await store.get_job("alice", later.id) is not None
    # Erasing the user's memories erases their jobs, queued and finished.
    queued = ExtractionJob(new_id("job"), "alice", "{}", 0, 0.0, 4.0)
    await store.enqueue_job(queued)
    await store.delete_all_memories("alice")
    assert await store.get_job("alice", queued.id) is None
    assert await store.get_job("alice", later.id) is None


async def test_vector_search_sees_every_change_made_after_earlier_searches(
    store: Store, emulated: bool
) -> None:
    if emulated:
        pytest.skip(NO_KNN)
    await store.set_embedding_space(EmbeddingSpace("fake/embed", 16))
    mems = [memory("alice", f"fact {i}") for i in range(6)]
    await store.apply_memory_changes("alice", [add(m, unit(i)) for i, m in enumerate(mems)])
    # Search first (a store may cache the user's vectors), then change things.
    assert (await store.vector_search_memories("alice", unit(0), MemoryFilter(), 1))[
        0
    ].memory.id == mems[0].id

    new = memory("alice", "fact new", categories=("fresh",))
    moved = replace(mems[1], text="moved", categories=("moved",))
    recategorised = replace(mems[2], categories=("tagged",))
    await store.apply_memory_changes(
        "alice",
        [
            add(new, unit(50)),
            MemoryChange(EVENT_UPDATE, moved, None, unit(51)),
            MemoryChange(EVENT_UPDATE, recategorised, None),
            MemoryChange(EVENT_DELETE, mems[0], None),
        ],
    )
    top = await store.vector_search_memories("alice", unit(0), MemoryFilter(), 10)
    assert mems[0].id not in {h.memory.id for h in top} and len(top) == 6
    assert (await store.vector_search_memories("alice", unit(50), MemoryFilter(), 1))[
        0
    ].memory.id == new.id
    best_moved = (await store.vector_search_memories("alice", unit(51), MemoryFilter(), 1))[0]
    assert (best_moved.memory.id, best_moved.memory.text) == (mems[1].id, "moved")
    tagged = await store.vector_search_memories(
        "alice", unit(2), MemoryFilter(categories=("tagged",)), 10
    )
    assert [h.memory.id for h in tagged] == [mems[2].id]
    fresh = await store.vector_search_memories(
        "alice", unit(2), MemoryFilter(categories=("fresh",)), 10
    )
    assert [h.memory.id for h in fresh] == [new.id]


async def test_message_vectors_are_per_user_filtered_and_follow_the_space(
    store: Store, emulated: bool
) -> None:
    await store.set_embedding_space(EmbeddingSpace("fake/embed", 16))
    mine = conversation("alice", "Mine")
    theirs = conversation("bob")
    await store.create_conversation(mine)
    await store.create_conversation(theirs)
    stored = await store.append_messages(
        "alice",
        mine.id,
        [message(ROLE_USER, "first <b>"), message(ROLE_ASSISTANT, "second")],
        1.0,
    )
    await store.append_messages("bob", theirs.id, [message(ROLE_USER, "bob's")], 2.0)
    assert stored is not None
    first, second = stored[0]
    pending = await store.messages_without_vectors(10)
    assert sorted((u, m.content) for u, m in pending) == [
        ("alice", "first <b>"),
        ("alice", "second"),
        ("bob", "bob's"),
    ]
    await store.set_message_vectors(
        [
            MessageVector("alice", first.id, unit(1)),
            MessageVector("alice", second.id, unit(2), "only the first 6 of 12 characters"),
            MessageVector("bob", first.id, unit(3)),
        ]
    )
    assert [(u, m.content) for u, m in await store.messages_without_vectors(10)] == [
        ("bob", "bob's")
    ]
    listed = await store.list_messages("alice", mine.id, False, None, 10)
    assert listed is not None
    assert [dict(m.metadata) for m in listed] == [
        {},
        {MESSAGE_EMBEDDING_NOTE: "only the first 6 of 12 characters"},
    ]
    # A message marked as getting no vector is never handed out again.
    bobs = (await store.messages_without_vectors(10))[0][1]
    await store.set_message_vectors([MessageVector("bob", bobs.id, None, "not embedded")])
    assert await store.messages_without_vectors(10) == []
    if emulated:
        pytest.skip(NO_KNN)
    hits = await store.vector_search_messages("alice", unit(1), "", (), 10)
    assert [h.message.id for h in hits] == [first.id, second.id]
    assert hits[0].relevance == pytest.approx(1.0, abs=1e-5)
    assert hits[0].snippets == ["first &lt;b&gt;"] and hits[0].conversation_title == "Mine"
    assert await store.vector_search_messages("bob", unit(1), "", (), 10) == []
    only = await store.vector_search_messages("alice", unit(1), "", (ROLE_ASSISTANT,), 10)
    assert [h.message.id for h in only] == [second.id]
    assert await store.vector_search_messages("alice", unit(1), theirs.id, (), 10) == []

    await store.set_embedding_space(EmbeddingSpace("fake/other", 8))
    assert len(await store.messages_without_vectors(10)) == 3
    assert await store.vector_search_messages("alice", unit(1, 8), "", (), 10) == []


async def test_a_sqlite_file_of_schema_1_is_indexed_again_folded(tmp_path: Path) -> None:
    """Rows stored before folding are found by folded queries once the store
    has reopened the file (its full-text indices are rebuilt, folded)."""
    path = tmp_path / "memory.sqlite3"
    store = await SqliteStore.open(path)
    mem = memory("alice", f"Works at {FULL_WIDTH_ACME} Corp")
    await store.apply_memory_changes("alice", [add(mem)])
    chat = conversation("alice", "t")
    await store.create_conversation(chat)
    await store.append_messages("alice", chat.id, [message(ROLE_USER, f"in {NFD_ZURICH}")], 1.0)
    await store.close()
    # Back to what schema 1 wrote: triggers and indices of the text as it was.
    db = sqlite3.connect(path)
    for table, column in (("messages", "content"), ("memories", "text")):
        for event in ("ai", "ad", "au"):
            db.execute(f"DROP TRIGGER IF EXISTS {table}_{event}")
        db.execute(f"INSERT INTO {table}_fts ({table}_fts) VALUES ('delete-all')")
        db.execute(f"INSERT INTO {table}_fts (rowid, {column}) SELECT seq, {column} FROM {table}")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    store = await SqliteStore.open(path)
    try:
        hits = await store.keyword_search_memories("alice", "acme", MemoryFilter(), 10)
        assert [h.memory.id for h in hits] == [mem.id]
        assert [
            h.message.content for h in await store.search_messages("alice", "zurich", "", (), 10)
        ] == [f"in {NFD_ZURICH}"]
        # New writes are indexed folded too.
        later = memory("alice", "Reads \ufb01nance news")
        await store.apply_memory_changes("alice", [add(later)])
        hits = await store.keyword_search_memories("alice", "finance", MemoryFilter(), 10)
        assert [h.memory.id for h in hits] == [later.id]
    finally:
        await store.close()


async def test_a_sqlite_file_of_schema_2_is_indexed_again_stemmed(tmp_path: Path) -> None:
    """Keyword search matches other forms of a word ("painted" finds
    "painting"), also for rows stored before stemming, once the store has
    reopened the file (its full-text indices are made again)."""
    path = tmp_path / "memory.sqlite3"
    store = await SqliteStore.open(path)
    mem = memory("alice", "Went painting by the lake")
    await store.apply_memory_changes("alice", [add(mem)])
    chat = conversation("alice", "t")
    await store.create_conversation(chat)
    await store.append_messages("alice", chat.id, [message(ROLE_USER, "the kids loved it")], 1.0)
    await store.close()
    # Back to what schema 2 wrote: indices without stemming.
    db = sqlite3.connect(path)
    for table, column in (("messages", "content"), ("memories", "text")):
        db.execute(f"DROP TABLE {table}_fts")
        db.execute(
            f"CREATE VIRTUAL TABLE {table}_fts USING fts5({column}, content='{table}', "
            "content_rowid='seq', tokenize='unicode61 remove_diacritics 2')"
        )
        db.execute(f"INSERT INTO {table}_fts (rowid, {column}) SELECT seq, {column} FROM {table}")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    unstemmed = db.execute("SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'painted'")
    assert unstemmed.fetchone()[0] == 0
    db.close()

    store = await SqliteStore.open(path)
    try:
        hits = await store.keyword_search_memories("alice", "painted", MemoryFilter(), 10)
        assert [h.memory.id for h in hits] == [mem.id]
        [hit] = await store.search_messages("alice", "kid loves", "", (), 10)
        assert hit.message.content == "the kids loved it"
        assert hit.snippets == ["the <mark>kids</mark> <mark>loved</mark> it"]
        # New writes are indexed stemmed too.
        later = memory("alice", "Runs marathons")
        await store.apply_memory_changes("alice", [add(later)])
        hits = await store.keyword_search_memories("alice", "marathon running", MemoryFilter(), 10)
        assert [h.memory.id for h in hits] == [later.id]
    finally:
        await store.close()


async def test_sqlite_keyword_search_weighs_words_by_the_users_own_memories(
    tmp_path: Path,
) -> None:
    """A word nearly all of a user's memories hold tells them apart less than
    one few of them hold, whatever other users' memories hold: Alice's
    memories nearly all name Caroline, Bob's all say pottery. Weighed among
    every user's memories, "caroline" would be the rare word and "pottery"
    the common one, and a memory naming Caroline would come first."""
    store = await SqliteStore.open(tmp_path / "memory.sqlite3")
    try:
        alice = [memory("alice", f"Caroline: we talked about topic {i}") for i in range(4)]
        pottery = memory("alice", "Melanie: pottery is fun")
        await store.apply_memory_changes("alice", [add(m) for m in (*alice, pottery)])
        bob = [memory("bob", f"pottery class number {i}") for i in range(30)]
        await store.apply_memory_changes("bob", [add(m) for m in bob])

        hits = await store.keyword_search_memories(
            "alice", "Caroline's pottery?", MemoryFilter(), 10
        )
        assert hits[0].memory.id == pottery.id
        assert {h.memory.id for h in hits} == {m.id for m in (*alice, pottery)}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    finally:
        await store.close()
