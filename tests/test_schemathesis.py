"""The OpenAPI document says exactly what the gateway accepts: schemathesis
(`--checks all`) runs every operation of /openapi.json against a running
suite, with a key without `admin` and with an admin key, and finds no server
error, no schema-valid request refused, no schema-violating one accepted, no
answer outside the document.

Bounded for CI: a fixed seed and 10 examples per operation and phase
(tests/schemathesis.toml), about a minute per run on two busy cores. The
rules between fields a JSON Schema cannot state are kept by
tests/schemathesis_hooks.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeOllama
from tests.stack import Stack, start_stack

ROOT = Path(__file__).resolve().parents[1]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MODEL = "ollama/llama3.2:latest"
ANTHROPIC = "^/v1/messages"
KEYS = "^/api/keys"


@pytest.fixture(scope="module")
def fuzzed(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A suite of its own (what the runs create stays out of the shared one),
    with models for extraction and embeddings, so no request is refused for
    want of configuration."""
    running = start_stack(
        tmp_path_factory.mktemp("fuzzed"),
        ollama.base_url,
        MARIE_MEMORY_EXTRACTION_MODEL=MODEL,
        MARIE_MEMORY_EMBEDDING_MODEL=MODEL,
    )
    yield running
    running.stop()


def _run(stack: Stack, key: str, *selection: str) -> None:
    done = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            "tests/schemathesis.toml",
            "run",
            f"{stack.base_url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {key}",
            "--no-color",
            *selection,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-20_000:] + done.stderr[-5_000:]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("role", ["user", "admin"])
def test_every_operation_answers_as_the_document_says(fuzzed: Stack, role: str) -> None:
    scopes = ["chat", "models:read", "embeddings", "memory"]
    if role == "admin":
        scopes.append("admin")
    key = fuzzed.create_key(f"fuzz-{role}", *[f"--scope={s}" for s in scopes])

    _run(fuzzed, key, "--exclude-path-regex", f"{ANTHROPIC}|{KEYS}")
    # As Anthropic's API, a method /v1/messages lacks is a 404 not_found_error
    # (tests/test_e2e_anthropic.py), not the 405 schemathesis' unsupported_method wants.
    _run(fuzzed, key, "--include-path-regex", ANTHROPIC, "--exclude-checks", "unsupported_method")
    # DELETE /api/keys/{key_id} revokes: the key stays readable, `state: revoked`
    # (its usage and audit trail stay), which use_after_free takes for a
    # deleted resource still served.
    _run(fuzzed, key, "--include-path-regex", KEYS, "--exclude-checks", "use_after_free")
