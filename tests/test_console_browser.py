"""The web console (web/) tested where it runs: its component tests (Vitest),
then the built console in real headless Chromium against the real suite and the
fake Ollama. The browser is Debian's chromium driven by playwright-core from
web/node_modules (web/e2e/console.e2e.mjs); nothing downloads a browser.

The script drives the console as a person would; this test seeds the data it
needs and checks what reached the fake and the API: the model a conversation
was switched to answered the next turn, a stopped answer disconnected from the
fake, the key made in the browser works until it is revoked there."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes import FakeOllama
from tests.stack import ROOT, Stack, start_stack

WEB = ROOT / "web"
CHROMIUM = Path(os.environ.get("MARIE_CHROMIUM", "/usr/bin/chromium"))


def _node_reason() -> str | None:
    """Why the console's tests cannot run here, or None (Vite 8 needs Node.js 20.19+)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are needed for the console's tests (install Node.js 20.19+)"
    found = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    major, minor = (int(x) for x in found.stdout.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 19):
        return f"the console's build needs Node.js 20.19+, found {found.stdout.strip()}"
    return None


NODE_REASON = _node_reason() or ""
NODE_MISSING = bool(NODE_REASON)


def _run(
    command: list[str], cwd: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def built() -> None:
    """web/node_modules installed and web/dist built (when missing or stale)."""
    done = _run(["make", "-s", "web"], ROOT, 600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(NODE_MISSING, reason=NODE_REASON)
@pytest.mark.timeout(600)
def test_console_component_tests(built: None) -> None:
    done = _run(["npm", "run", "-s", "test"], WEB, 540, CI="1", NO_COLOR="1")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert "failed" not in done.stdout.lower().split("tests", 1)[-1].split("\n", 1)[0]


@pytest.fixture(scope="module")
def console_stack(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(
        tmp_path_factory.mktemp("marie-console"),
        ollama.base_url,
        MARIE_MEMORY_EMBEDDING_MODEL="ollama/nomic-embed-text:latest",
    )
    yield running
    running.stop()


def _key(stack: Stack, name: str, *extra: str) -> str:
    done = stack.marie("keys", "create", "--name", name, "--json", *extra)
    assert done.returncode == 0, done.stderr
    key: str = orjson.loads(done.stdout)["key"]
    return key


def _chat(ollama: FakeOllama, last_user_message: str) -> dict[str, Any]:
    """The /api/chat body the fake received whose last message is this one."""
    for request in ollama.chat_requests:
        messages = request.body["messages"]
        if messages and messages[-1]["content"] == last_user_message:
            body: dict[str, Any] = request.body
            return body
    raise AssertionError(f"no chat request ended with {last_user_message!r}")


@pytest.mark.skipif(NODE_MISSING, reason=NODE_REASON)
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)",
)
@pytest.mark.timeout(600)
def test_the_console_in_a_real_browser(
    built: None, console_stack: Stack, ollama: FakeOllama, tmp_path: Path
) -> None:
    stack = console_stack
    user = _key(stack, "alice", "--owner", "alice")
    admin = _key(
        stack,
        "root",
        "--scope",
        "admin",
        "--scope",
        "chat",
        "--scope",
        "models:read",
        "--scope",
        "memory",
    )
    headers = {"authorization": f"Bearer {user}"}
    seeded = httpx.post(
        f"{stack.base_url}/api/memories",
        headers=headers,
        json={
            "messages": [
                {"role": "user", "content": "Alice likes green tea"},
                {"role": "user", "content": "Alice lives in Lyon"},
            ],
            "infer": False,
        },
        timeout=30,
    )
    assert seeded.status_code == 200, seeded.text
    disconnects_before = ollama.disconnects
    shots = Path(os.environ.get("MARIE_CONSOLE_SCREENSHOTS", tmp_path / "screens"))

    done = _run(
        ["node", "e2e/console.e2e.mjs"],
        WEB,
        540,
        CONSOLE_URL=stack.base_url,
        USER_KEY=user,
        ADMIN_KEY=admin,
        SCREENSHOT_DIR=str(shots.resolve()),
        CHROMIUM=str(CHROMIUM),
    )
    assert done.returncode == 0, done.stderr[-8000:]
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True

    # The first turns went to the conversation's first model; after the switch
    # in the browser, the next turn reached the new one, with the history.
    assert _chat(ollama, "I like **green tea**")["model"] == "llama3.2:latest"
    coffee = _chat(ollama, "What about coffee?")
    assert coffee["model"] == "qwen2.5:0.5b"
    assert "I like **green tea**" in [m["content"] for m in coffee["messages"]]
    # Stop (button, then Esc) really cancelled: the fake saw both disconnects.
    assert _chat(ollama, "Tell me everything")["model"] == "endless:latest"
    assert ollama.disconnects - disconnects_before >= 2

    # What the browser did is what the API holds.
    conversations = httpx.get(f"{stack.base_url}/api/conversations", headers=headers).json()
    titles = [c["title"] for c in conversations["data"]]
    assert "Tea talk" in titles and "Renamed story" not in titles and "Endless story" not in titles
    assert httpx.get(f"{stack.base_url}/api/memories", headers=headers).json()["data"] == []
    # The key made, edited, rotated and revoked in the browser: both secrets
    # are refused now, and the API holds what the forms said.
    for secret in (result["createdKey"], result["rotatedKey"]):
        refused = httpx.get(
            f"{stack.base_url}/api/usage", headers={"authorization": f"Bearer {secret}"}
        )
        assert refused.status_code == 401
    listed = httpx.get(
        f"{stack.base_url}/api/keys",
        params={"include_inactive": "true"},
        headers={"authorization": f"Bearer {admin}"},
    ).json()["data"]
    made = [k for k in listed if k["name"] == result["keyName"]]
    assert len(made) == 2  # the first secret and its rotation
    assert {k["state"] for k in made} == {"revoked"} and {k["owner"] for k in made} == {"bob"}
    assert any(
        k["limits"]["requests_per_minute"] == 60 and k["allowed_models"] == ["ollama/*"]
        for k in made
    )
    # The monthly budget typed in the create form is the key's budget.
    first = min(made, key=lambda k: k["created_at"])
    budget = httpx.get(
        f"{stack.base_url}/api/budgets/keys/{first['id']}",
        headers={"authorization": f"Bearer {admin}"},
    ).json()
    assert budget["monthly_usd"] == "5"
    for name in ("sign-in", "model-selector", "chat", "search", "compare", "memories", "keys"):
        assert (shots / f"{name}.png").stat().st_size > 5_000


@pytest.mark.skipif(NODE_MISSING, reason=NODE_REASON)
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)",
)
@pytest.mark.timeout(300)
def test_the_api_docs_page_renders_under_its_content_security_policy(
    built: None, console_stack: Stack
) -> None:
    """/docs allows only this origin's scripts and no inline ones: Swagger UI
    must still render the document, with nothing refused by the policy."""
    done = _run(
        ["node", "e2e/docs.e2e.mjs"],
        WEB,
        240,
        DOCS_URL=f"{console_stack.base_url}/docs",
        CHROMIUM=str(CHROMIUM),
    )
    assert done.returncode == 0, done.stderr[-8000:]
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["title"].startswith("Marie gateway")
    assert result["problems"] == []
