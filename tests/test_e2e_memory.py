"""The memory REST surface end to end: `marie up` with the memory service on SQLite,
embeddings and extraction through providers and the fake Ollama, real HTTP."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from marie.memory.v1 import memory_service_pb2_grpc as memory_grpc

from tests.fakes import FakeOllama
from tests.stack import Stack, start_stack

CHAT_MODEL = "ollama/llama3.2:latest"


@pytest.fixture(scope="module")
def mem_stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("marie-memory"),
        ollama.base_url,
        MARIE_MEMORY_EMBEDDING_MODEL="ollama/nomic-embed-text:latest",
        MARIE_MEMORY_EXTRACTION_MODEL=CHAT_MODEL,
        MARIE_MEMORY_QUEUE_POLL_SECONDS="0.05",
        MARIE_GATEWAY_MEMORY="all",
    )
    yield running
    running.stop()


def _key(stack: Stack, name: str, *extra: str) -> str:
    done = stack.marie("keys", "create", "--name", name, "--json", *extra)
    assert done.returncode == 0, done.stderr
    key: str = orjson.loads(done.stdout)["key"]
    return key


@pytest.fixture(scope="module")
def acme(mem_stack: Stack) -> str:
    return _key(mem_stack, "acme", "--owner", "acme")


@pytest.fixture(scope="module")
def globex(mem_stack: Stack) -> str:
    return _key(mem_stack, "globex", "--owner", "globex")


Client = Callable[..., httpx.Response]


def client(stack: Stack, key: str) -> Client:
    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return httpx.request(
            method, f"{stack.base_url}{path}", headers=headers, timeout=30, **kwargs
        )

    return call


def _sse(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def _sent(ollama: FakeOllama, last_content: str) -> Any:
    """The body of the last chat request upstream whose last message is `last_content`
    (background extraction calls go to the same fake)."""
    return next(
        r.body
        for r in reversed(ollama.chat_requests)
        if r.body["messages"][-1]["content"] == last_content
    )


def _wait(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_conversation_streams_turns_stores_them_and_remembers(
    mem_stack: Stack, acme: str, ollama: FakeOllama
) -> None:
    api = client(mem_stack, acme)
    created = api("POST", "/api/conversations", json={"title": "Tea talk", "model": CHAT_MODEL})
    assert created.status_code == 201, created.text
    conv = created.json()
    assert conv["title"] == "Tea talk" and conv["model"] == CHAT_MODEL and conv["id"]

    turn = api(
        "POST", f"/api/conversations/{conv['id']}/messages", json={"content": "I like green tea."}
    )
    assert turn.status_code == 200, turn.text
    assert turn.headers["content-type"].startswith("text/event-stream")
    events = _sse(turn)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e.get("object") == "chat.completion.chunk"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello from llama3.2:latest! You said: I like green tea."

    listed = api("GET", f"/api/conversations/{conv['id']}/messages").json()
    user_msg, answer = listed["data"]
    assert (user_msg["role"], user_msg["content"]) == ("user", "I like green tea.")
    assert answer["role"] == "assistant" and answer["content"] == text
    assert answer["prompt_tokens"] > 0 and answer["completion_tokens"] > 0
    assert int(answer["metadata"]["latency_ms"]) >= 0 and "partial" not in answer["metadata"]
    assert listed["next_page_token"] == ""

    # The exchange was queued for extraction: the fact shows up shortly.
    def remembered() -> bool:
        data = api("GET", "/api/memories").json()["data"]
        return [m["text"] for m in data] == ["Like green tea"]

    assert _wait(remembered)
    memory = api("GET", "/api/memories").json()["data"][0]
    assert memory["source_conversation_id"] == conv["id"]

    # The next turn carries the memory as a system message, on the new model.
    patched = api("PATCH", f"/api/conversations/{conv['id']}", json={"model": "ollama/gemma3:1b"})
    assert patched.status_code == 200 and patched.json()["model"] == "ollama/gemma3:1b"
    reply = api(
        "POST",
        f"/api/conversations/{conv['id']}/messages",
        json={"content": "What tea should I buy?", "stream": False},
    )
    assert reply.status_code == 200, reply.text
    stored = reply.json()
    assert stored["object"] == "conversation.message" and stored["role"] == "assistant"
    assert stored["position"] == 3
    upstream = _sent(ollama, "What tea should I buy?")
    assert upstream["model"] == "gemma3:1b"
    system = upstream["messages"][0]
    assert system["role"] == "system" and "- Like green tea" in system["content"]
    assert [m["content"] for m in upstream["messages"][1:]] == [
        "I like green tea.",
        text,
        "What tea should I buy?",
    ]

    found = api("GET", "/api/search", params={"q": "green tea"}).json()
    assert found["data"][0]["snippet"].count("<mark>") >= 1
    assert found["data"][0]["conversation_title"] == "Tea talk"
    assert 0 < found["data"][0]["score"] <= 1


def test_memories_routes_add_search_change_and_erase(mem_stack: Stack, acme: str) -> None:
    api = client(mem_stack, acme)
    user = {"user": "mem-routes"}
    added = api(
        "POST",
        "/api/memories",
        json={
            "messages": [{"role": "user", "content": "Owns a red bicycle"}],
            "infer": False,
            **user,
        },
    )
    assert added.status_code == 200, added.text
    (result,) = added.json()["data"]
    assert result["event"] == "ADD" and result["text"] == "Owns a red bicycle"
    memory_id = result["id"]

    inferred = api(
        "POST",
        "/api/memories",
        json={"messages": [{"role": "user", "content": "I am allergic to peanuts."}], **user},
    ).json()
    assert [(r["event"], r["text"]) for r in inferred["data"]] == [
        ("ADD", "Is allergic to peanuts")
    ]

    search = api("GET", "/api/memories/search", params={"q": "bicycle", **user}).json()
    assert search["mode"] == "hybrid" and search["data"][0]["id"] == memory_id
    assert 0 < search["data"][0]["score"] <= 1

    patched = api(
        "PATCH", f"/api/memories/{memory_id}", json={"text": "Owns a blue bicycle", **user}
    )
    assert patched.status_code == 200 and patched.json()["text"] == "Owns a blue bicycle"
    history = api("GET", f"/api/memories/{memory_id}/history", params=user).json()["data"]
    assert [h["event"] for h in history] == ["ADD", "UPDATE"]
    assert history[1]["actor"].startswith("key:")

    assert api("DELETE", f"/api/memories/{memory_id}", params=user).status_code == 200
    gone = api("GET", f"/api/memories/{memory_id}", params=user)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "memory_not_found"

    erased = api("DELETE", "/api/memories", params=user).json()
    assert erased["deleted"] == 1
    assert api("GET", "/api/memories", params=user).json()["data"] == []
    assert api("GET", "/api/memories/search", params={"q": "peanuts", **user}).json()["data"] == []

    bad = api("GET", "/api/memories/search", params={"q": "", **user})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "q"
    bad = api("POST", "/api/memories", json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_a_key_with_the_longest_owner_uses_memory_and_conversations(mem_stack: Stack) -> None:
    """An owner of 256 characters (auth's limit), as the tenant's own end user
    and with a 128-character `user`: its data is stored, found and listed."""
    owner = "o" * 255 + "é"
    api = client(mem_stack, _key(mem_stack, "longest-owner", "--owner", owner))
    for user in ({}, {"user": "u" * 128}):
        added = api(
            "POST",
            "/api/memories",
            json={"messages": [{"role": "user", "content": "Plays the cello"}], "infer": False}
            | user,
        )
        assert added.status_code == 200, added.text
        found = api("GET", "/api/memories/search", params={"q": "cello", **user})
        assert found.status_code == 200, found.text
        assert [m["text"] for m in found.json()["data"]] == ["Plays the cello"]
        made = api("POST", "/api/conversations", json={"title": "long owner"} | user)
        assert made.status_code == 201, made.text
        listed = api("GET", "/api/conversations", params=user).json()["data"]
        assert [c["id"] for c in listed] == [made.json()["id"]]


def test_a_background_extraction_reports_its_state_to_its_own_tenant(
    mem_stack: Stack, acme: str, globex: str
) -> None:
    api = client(mem_stack, acme)
    user = {"user": "mem-jobs"}
    queued = api(
        "POST",
        "/api/memories",
        json={
            "messages": [{"role": "user", "content": "I live in Lyon."}],
            "background": True,
            **user,
        },
    )
    assert queued.status_code == 200, queued.text
    job_id = queued.json()["job_id"]

    def job() -> Any:
        return api("GET", f"/api/memories/jobs/{job_id}", params=user).json()

    assert _wait(lambda: job()["status"] == "succeeded"), job()
    done = job()
    assert done["object"] == "memory.extraction_job" and done["id"] == job_id
    assert [(c["event"], c["text"]) for c in done["data"]] == [("ADD", "Live in Lyon")]
    assert done["attempts"] == 1 and done["failure_reason"] is None
    assert done["finished_at"] >= done["created_at"] and done["next_attempt_at"] is None
    # Another tenant's key, another user, an unknown id: 404 alike.
    for caller, params, path in (
        (client(mem_stack, globex), user, job_id),
        (api, {"user": "someone-else"}, job_id),
        (api, user, "job_nope"),
    ):
        missing = caller("GET", f"/api/memories/jobs/{path}", params=params)
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "job_not_found"


def test_tenants_and_end_users_never_see_each_other(
    mem_stack: Stack, acme: str, globex: str
) -> None:
    a = client(mem_stack, acme)
    b = client(mem_stack, globex)
    conv = a(
        "POST", "/api/conversations", json={"title": "secret", "model": CHAT_MODEL, "user": "u1"}
    ).json()
    mem = a(
        "POST",
        "/api/memories",
        json={
            "messages": [{"role": "user", "content": "secret fact"}],
            "infer": False,
            "user": "u1",
        },
    ).json()["data"][0]
    a(
        "POST",
        f"/api/conversations/{conv['id']}/messages",
        json={"content": "a secret message", "user": "u1", "stream": False},
    )

    # Another tenant, even naming the same end user; and another end user of the same tenant.
    for api, user in ((b, "u1"), (a, "u2"), (a, "U1")):
        params = {"user": user} if user else {}
        body = {"user": user} if user else {}
        for method, path, kwargs in [
            ("GET", f"/api/conversations/{conv['id']}", {"params": params}),
            ("PATCH", f"/api/conversations/{conv['id']}", {"json": {"title": "x", **body}}),
            ("DELETE", f"/api/conversations/{conv['id']}", {"params": params}),
            ("GET", f"/api/conversations/{conv['id']}/messages", {"params": params}),
            (
                "POST",
                f"/api/conversations/{conv['id']}/messages",
                {"json": {"content": "hi", **body}},
            ),
            ("GET", f"/api/memories/{mem['id']}", {"params": params}),
            ("PATCH", f"/api/memories/{mem['id']}", {"json": {"text": "x", **body}}),
            ("DELETE", f"/api/memories/{mem['id']}", {"params": params}),
            ("GET", f"/api/memories/{mem['id']}/history", {"params": params}),
        ]:
            response = api(method, path, **kwargs)
            assert response.status_code == 404, (method, path, user, response.text)
        assert api("GET", "/api/conversations", params=params).json()["data"] == []
        assert api("GET", "/api/memories", params=params).json()["data"] == []
        assert api("GET", "/api/search", params={"q": "secret", **params}).json()["data"] == []
        assert (
            api("GET", "/api/memories/search", params={"q": "secret", **params}).json()["data"]
            == []
        )
        assert api("DELETE", "/api/memories", params=params).json()["deleted"] == 0

    # The owner still has everything.
    assert a("GET", f"/api/memories/{mem['id']}", params={"user": "u1"}).status_code == 200
    assert (
        len(
            a("GET", f"/api/conversations/{conv['id']}/messages", params={"user": "u1"}).json()[
                "data"
            ]
        )
        == 2
    )
    # Naming a tenant takes the admin scope.
    denied = a("GET", "/api/memories", params={"tenant": "globex"})
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "tenant"


def test_memory_routes_need_the_memory_scope(mem_stack: Stack) -> None:
    chat_only = client(mem_stack, _key(mem_stack, "chat-only", "--scope", "chat"))
    response = chat_only("GET", "/api/memories")
    assert response.status_code == 403
    assert "'memory' scope" in response.json()["error"]["message"]


def test_chat_completions_with_user_are_enriched(
    mem_stack: Stack, acme: str, ollama: FakeOllama
) -> None:
    api = client(mem_stack, acme)
    api(
        "POST",
        "/api/memories",
        json={
            "messages": [{"role": "user", "content": "Prefers answers in French"}],
            "infer": False,
            "user": "enriched",
        },
    )
    reply = api(
        "POST",
        "/v1/chat/completions",
        json={
            "model": CHAT_MODEL,
            "user": "enriched",
            "messages": [{"role": "user", "content": "How should you answer me? French?"}],
        },
    )
    assert reply.status_code == 200, reply.text
    sent = _sent(ollama, "How should you answer me? French?")["messages"]
    assert sent[0]["role"] == "system" and "Prefers answers in French" in sent[0]["content"]
    # Without `user`, nothing is added.
    api(
        "POST",
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "French?"}]},
    )
    assert [m["role"] for m in _sent(ollama, "French?")["messages"]] == ["user"]


def test_anthropic_messages_with_metadata_user_id_are_enriched(
    mem_stack: Stack, acme: str, ollama: FakeOllama
) -> None:
    """Anthropic's `metadata.user_id` is the end user, as OpenAI's `user` is."""
    api = client(mem_stack, acme)
    api(
        "POST",
        "/api/memories",
        json={
            "messages": [{"role": "user", "content": "Writes Rust at work"}],
            "infer": False,
            "user": "claude-user",
        },
    )
    reply = api(
        "POST",
        "/v1/messages",
        json={
            "model": CHAT_MODEL,
            "max_tokens": 32,
            "system": "Be brief.",
            "metadata": {"user_id": "claude-user"},
            "messages": [{"role": "user", "content": "Which language do I write at work?"}],
        },
    )
    assert reply.status_code == 200, reply.text
    sent = _sent(ollama, "Which language do I write at work?")["messages"]
    assert sent[0]["role"] == "system" and "Writes Rust at work" in sent[0]["content"]
    assert sent[1] == {"role": "system", "content": "Be brief."}


def test_a_client_leaving_mid_answer_leaves_the_partial_answer_marked(
    mem_stack: Stack, acme: str, ollama: FakeOllama
) -> None:
    api = client(mem_stack, acme)
    conv = api("POST", "/api/conversations", json={"model": "ollama/endless:latest"}).json()
    url = f"{mem_stack.base_url}/api/conversations/{conv['id']}/messages"
    with httpx.stream(
        "POST",
        url,
        json={"content": "talk forever"},
        headers={"authorization": f"Bearer {acme}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break

    def stored() -> bool:
        data = api("GET", f"/api/conversations/{conv['id']}/messages").json()["data"]
        return len(data) == 2

    assert _wait(stored)
    answer = api("GET", f"/api/conversations/{conv['id']}/messages").json()["data"][1]
    assert answer["metadata"]["partial"] == "true" and answer["content"]


class _HangingMemory(memory_grpc.MemoryServiceServicer):
    """A memory service whose SearchMemories never answers (until released)."""

    def __init__(self) -> None:
        self.searches = 0
        self.release = threading.Event()

    def SearchMemories(self, request: Any, context: Any) -> Any:
        self.searches += 1
        self.release.wait(30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")


def test_a_slow_or_dead_memory_service_never_fails_or_holds_a_chat(
    ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    hanging = _HangingMemory()  # type: ignore[abstract]  # only SearchMemories is served
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    memory_grpc.add_MemoryServiceServicer_to_server(hanging, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stack = start_stack(
        tmp_path_factory.mktemp("marie-nomem"),
        ollama.base_url,
        MARIE_GATEWAY_MEMORY="all",
        MARIE_GATEWAY_MEMORY_ADDR=f"127.0.0.1:{port}",
        MARIE_GATEWAY_MEMORY_TIMEOUT_SECONDS="0.3",
    )
    try:
        api = client(stack, _key(stack, "k"))
        body = {"model": CHAT_MODEL, "user": "someone"}
        for content in ("Hello while memory hangs", "Hello while memory is gone"):
            started = time.monotonic()
            reply = api(
                "POST",
                "/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": content}]},
            )
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - started < 3
            assert [m["role"] for m in _sent(ollama, content)["messages"]] == ["user"]
            if hanging.searches:  # asked, then abandoned at the deadline: now kill it
                hanging.release.set()
                server.stop(0).wait()
        assert hanging.searches == 1
        down = api("GET", "/api/memories")
        assert down.status_code == 503 and down.json()["error"]["type"] == "server_error"
    finally:
        hanging.release.set()
        server.stop(0)
        stack.stop()


def test_memory_extraction_is_recorded_in_the_ledger_under_the_turns_key(
    mem_stack: Stack,
) -> None:
    done = mem_stack.marie("keys", "create", "--name", "initech", "--owner", "initech", "--json")
    assert done.returncode == 0, done.stderr
    created = orjson.loads(done.stdout)
    key, key_id = created["key"], created["id"]
    api = client(mem_stack, key)
    conv = api("POST", "/api/conversations", json={"model": CHAT_MODEL}).json()
    turn = api(
        "POST",
        f"/api/conversations/{conv['id']}/messages",
        json={"content": "I like oolong tea.", "stream": False},
    )
    assert turn.status_code == 200, turn.text

    # The queued extraction's model calls (facts, then decisions) reach auth's
    # ledger under the key that made the turn and its owner.
    ledger = Path(mem_stack.env["MARIE_DATA_DIR"]) / "auth.sqlite3"

    def extraction_rows() -> list[sqlite3.Row]:
        with contextlib.closing(sqlite3.connect(ledger)) as db:
            db.row_factory = sqlite3.Row
            return db.execute(
                "SELECT * FROM usage_records WHERE operation = 'memory_extraction' "
                "AND key_id = ? ORDER BY time",
                (key_id,),
            ).fetchall()

    # One call for the facts; a decision call only for facts with a close memory.
    assert _wait(lambda: len(extraction_rows()) >= 1, timeout=15)
    rows = extraction_rows()
    for row in rows:
        assert row["owner"] == "initech"
        assert (row["provider"], row["model"]) == ("ollama", CHAT_MODEL)
        assert row["status"] == 200
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert row["latency_ms"] >= 0


def test_memory_extraction_is_held_to_the_keys_allowed_models(mem_stack: Stack) -> None:
    done = mem_stack.marie(
        "keys", "create", "--name", "gemma-only", "--model", "ollama/gemma3:1b", "--json"
    )
    assert done.returncode == 0, done.stderr
    created = orjson.loads(done.stdout)
    api = client(mem_stack, created["key"])
    # The deployment's extraction model is not one of the key's.
    refused = api(
        "POST",
        "/api/memories",
        json={"messages": [{"role": "user", "content": "I like oolong tea."}], "user": "g"},
    )
    assert refused.status_code == 403, refused.text
    assert "extraction model" in refused.json()["error"]["message"]

    # A turn's extraction is refused as well, before it is queued: the turn
    # itself is answered, the gateway says why nothing was queued, and no
    # model call is made for it (none in the ledger).
    conv = api("POST", "/api/conversations", json={"model": "ollama/gemma3:1b"}).json()
    turn = api(
        "POST",
        f"/api/conversations/{conv['id']}/messages",
        json={"content": "I like green tea.", "stream": False},
    )
    assert turn.status_code == 200, turn.text
    request_id = turn.headers["x-request-id"]

    def refusal_logged() -> bool:
        return any(
            "turn not queued for extraction" in line and request_id in line
            for line in mem_stack.log().splitlines()
        )

    assert _wait(refusal_logged, timeout=15)
    ledger = Path(mem_stack.env["MARIE_DATA_DIR"]) / "auth.sqlite3"
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute(
            "SELECT count(*) FROM usage_records WHERE operation = 'memory_extraction' "
            "AND key_id = ?",
            (created["id"],),
        ).fetchone()[0]
    assert rows == 0


def test_an_idempotency_key_makes_a_retried_write_take_effect_once(
    mem_stack: Stack, acme: str
) -> None:
    api = client(mem_stack, acme)
    user = {"user": "idem"}

    def post(path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return api("POST", path, json={**body, **user}, headers=headers)

    body = {"title": "Retried", "model": CHAT_MODEL}
    first = post("/api/conversations", body, **{"Idempotency-Key": "conv-1"})
    again = post("/api/conversations", body, **{"Idempotency-Key": "conv-1"})
    assert first.status_code == again.status_code == 201, again.text
    assert first.json()["id"] == again.json()["id"]
    conv = first.json()["id"]
    other = post("/api/conversations", body, **{"Idempotency-Key": "conv-2"})
    assert other.json()["id"] != conv
    # The same X-Request-Id on two writes without a key: two writes.
    plain = [post("/api/conversations", body, **{"X-Request-Id": "same-rid"}) for _ in range(2)]
    assert plain[0].json()["id"] != plain[1].json()["id"]
    listed = api("GET", "/api/conversations", params=user).json()["data"]
    assert sorted(c["id"] for c in listed) == sorted(
        [conv, other.json()["id"], plain[0].json()["id"], plain[1].json()["id"]]
    )

    turn = {"content": "Store me once.", "stream": False}
    path = f"/api/conversations/{conv}/messages"
    answers = [post(path, turn, **{"Idempotency-Key": "turn-1"}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["id"] == answers[1].json()["id"]
    stored = api("GET", path, params=user).json()["data"]
    assert [(m["role"], m["position"]) for m in stored] == [("user", 0), ("assistant", 1)]
    assert api("GET", f"/api/conversations/{conv}", params=user).json()["message_count"] == 2

    memory = {"messages": [{"role": "user", "content": "Keeps bees"}], "infer": False}
    added = [post("/api/memories", memory, **{"Idempotency-Key": "mem-1"}) for _ in range(2)]
    assert [a.json()["data"][0]["event"] for a in added] == ["ADD", "ADD"]
    assert added[0].json()["data"][0]["id"] == added[1].json()["data"][0]["id"]

    def texts() -> list[str]:
        data = api("GET", "/api/memories", params=user).json()["data"]
        return [m["text"] for m in data if m["text"] != "Store me once"]  # the turn's

    assert texts() == ["Keeps bees"]

    # A malformed key is refused in the error envelope, and nothing is stored.
    for bad in ("x" * 129, "caf\u00e9"):
        refused = api(
            "POST",
            "/api/memories",
            json={"messages": [{"role": "user", "content": "Refused"}], "infer": False, **user},
            headers={"Idempotency-Key": bad.encode()},
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "Idempotency-Key"
    assert texts() == ["Keeps bees"]
