"""The official OpenAI Node SDK (npm `openai`, pinned in tests/node_sdk with
its lock file) against the real suite: its Responses API program prints
``ok <check>`` per check and exits non-zero on a failure; this module asserts
the checks, then what the fake upstream received."""

from __future__ import annotations

import os
import subprocess

from tests.fakes import FakeOllama
from tests.node_tools import node_or_skip, npm_ci
from tests.stack import ROOT, Stack

PACKAGE = ROOT / "tests" / "node_sdk"
CHECKS = (
    "create",
    "stream",
    "tools",
    "parse",
    "chain",
    "retrieve_list_delete",
    "other_tenant",
    "bad_request",
)
RUN_TIMEOUT_SECONDS = 300


def test_the_node_sdk_speaks_the_responses_api(
    stack: Stack, api_key: str, ollama: FakeOllama
) -> None:
    node = node_or_skip("the Node SDK")
    npm_ci(PACKAGE, RUN_TIMEOUT_SECONDS)
    ollama.reset()
    env = {
        **os.environ,
        "MARIE_BASE_URL": stack.base_url,
        "MARIE_API_KEY": api_key,
        "MARIE_OTHER_KEY": stack.create_key("node-other", "--owner", "node-other-tenant"),
    }
    done = subprocess.run(
        [node, "responses.mjs"],
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert passed == list(CHECKS)

    bodies = [r.body for r in ollama.chat_requests if r.body is not None]
    # The tool round trip: the earlier turn and the tool's result went up.
    tool_turn = next(
        b for b in bodies if any(m.get("content") == "19C from node" for m in b["messages"])
    )
    assert [m["role"] for m in tool_turn["messages"]] == ["user", "assistant", "tool"]
    assert tool_turn["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    # The chain: the second request carried the first turn and its answer.
    chained = next(
        b for b in bodies if b["messages"][-1]["content"] == "Node asks: what is my name?"
    )
    assert chained["messages"] == [
        {"role": "user", "content": "Node says: my name is Ada."},
        {
            "role": "assistant",
            "content": "Hello from llama3.2:latest! You said: Node says: my name is Ada.",
        },
        {"role": "user", "content": "Node asks: what is my name?"},
    ]
    # The zod schema reached the upstream as Ollama's `format`.
    parsed = next(b for b in bodies if b["messages"][-1]["content"] == "count from node")
    assert parsed["format"]["properties"]["n"]["type"] == "integer"
