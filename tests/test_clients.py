"""The client libraries under clients/ against the real suite (issue 13).

For each language: build the client from protos/ (its `make clients-<lang>`
target), then run its end-to-end program against the running suite and the
fake Ollama, with addresses and a fresh API key in the environment. The
program prints ``ok <check> …`` per check and exits non-zero on a failure;
this module asserts the exit code, the checks and what the fake upstream saw.

A cancelled stream must reach the upstream while the client is still running
(not merely when its process exits): the program asks the probe server below,
which watches the fake's disconnect count, before it goes on.

Through Envoy (the real binary on deploy/envoy/envoy.yaml, tests/envoy.py),
whose ext_authz asks the gateway's /_authz: the client with its key lists
models, which proves the key went as `authorization: Bearer` (the only header
it sends it in); a call without a key is UNAUTHENTICATED. Envoy passes on the
gateway's refusal as a service's own: its plain message as grpc-message and
its ErrorInfo in grpc-status-details-bin, so each program checks the code, the
reason (INVALID_API_KEY) and the message.

A recorder server (MetadataRecorder) shows what each client puts on the wire:
its key, and the default deadline of each call.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pytest

from tests.envoy import Envoy, start_envoy
from tests.fakes import FakeOllama
from tests.stack import ROOT, Stack

UV = ROOT / ".tools" / "bin" / "uv"
CHAT_MODEL = "ollama/llama3.2:latest"
ENDLESS_MODEL = "ollama/endless:latest"
CHECKS = (
    "list_models",
    "get_model",
    "stream_chat",
    "cancel",
    "invalid_argument",
    "not_found",
    "bearer",
    "envoy_models",
    "unauthenticated",
    "auth_stub",
    "memory_stub",
)
# Unary calls that wait for a model: the clients give them the chat stream's
# default deadline (600 s), not the lookups' 10 s.
MODEL_CALLS = {
    "/marie.providers.v1.ProviderService/CreateChatCompletion",
    "/marie.providers.v1.ProviderService/CreateEmbeddings",
    "/marie.memory.v1.MemoryService/AddMemories",
}
RUN_TIMEOUT_SECONDS = 300
# A cold build (npm ci, Go's first compile, Maven's first resolve and compile)
# on a busy machine outlasts the suite's 120 s per test; each step is still
# bounded by RUN_TIMEOUT_SECONDS.
pytestmark = pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS)


@pytest.fixture(scope="module")
def probe_url(ollama: FakeOllama) -> Iterator[str]:
    """HTTP view of the fake's disconnects for programs in other processes:
    ``/disconnects`` (the count) and ``/wait-disconnect?count=N`` ("ok" once
    it reaches N, 504 after 10 s)."""

    class Probe(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/disconnects":
                status, body = 200, str(ollama.disconnects)
            elif url.path == "/wait-disconnect":
                count = int(parse_qs(url.query)["count"][0])
                reached = ollama.wait_for_disconnect(timeout=10, count=count)
                status, body = (200, "ok") if reached else (504, f"{ollama.disconnects}")
            else:
                status, body = 404, "unknown"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class MetadataRecorder(grpc.GenericRpcHandler):
    """A gRPC server that answers every call UNIMPLEMENTED and records what
    the client put on the wire: the method, its metadata and its deadline."""

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata)

        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            # Seconds left of the client's deadline (None: it set none).
            self.calls.append(RecordedCall(method, metadata, context.time_remaining()))
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"recorded {method}")

        return grpc.unary_unary_rpc_method_handler(refuse)


@dataclass(frozen=True)
class RecordedCall:
    method: str
    metadata: dict[str, str | bytes]
    deadline_seconds: float | None


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[MetadataRecorder, str]]:
    handler = MetadataRecorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield handler, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def envoy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    running = start_envoy(
        tmp_path_factory.mktemp("envoy"),
        {
            "gateway": stack.gateway_port,
            "providers": stack.providers_port,
            "auth": stack.auth_port,
            "memory": stack.memory_port,
        },
    )
    yield running
    running.stop()


@pytest.fixture
def client_env(
    stack: Stack,
    probe_url: str,
    recorder: tuple[MetadataRecorder, str],
    envoy: Envoy,
    paced_llama: None,  # every client checks its stream arrives in several chunks
) -> dict[str, str]:
    prompt = f"hello client {uuid.uuid4().hex[:8]}"
    return {
        **os.environ,
        "MARIE_ADDRESS": f"127.0.0.1:{stack.providers_port}",
        "MARIE_API_KEY": stack.create_key(f"client-{uuid.uuid4().hex[:6]}"),
        "MARIE_CHAT_MODEL": CHAT_MODEL,
        "MARIE_PROMPT": prompt,
        "MARIE_EXPECTED_REPLY": f"Hello from llama3.2:latest! You said: {prompt}",
        "MARIE_ENDLESS_MODEL": ENDLESS_MODEL,
        "MARIE_PROBE_URL": probe_url,
        "MARIE_RECORDER_ADDRESS": recorder[1],
        "MARIE_ENVOY_ADDRESS": envoy.target,
        "MARIE_MEMORY_ADDRESS": f"127.0.0.1:{stack.memory_port}",
        "MARIE_MEMORY_USER": f"client-user-{uuid.uuid4().hex[:8]}",
    }


def run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return done.stdout


def assert_checks(
    output: str, env: dict[str, str], ollama: FakeOllama, recorder: MetadataRecorder
) -> None:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)  # Maven colours its first line
    passed = {line.split()[1]: line for line in plain.splitlines() if line.startswith("ok ")}
    missing = [check for check in CHECKS if check not in passed]
    assert not missing, f"checks not reported: {missing}\n{output}"
    assert passed["stream_chat"].endswith(env["MARIE_EXPECTED_REPLY"])
    assert passed["invalid_argument"].split()[2] == "sampling.temperature"
    # Through Envoy: the key was accepted; without it, the gateway's refusal.
    assert int(passed["envoy_models"].split()[2]) > 0
    assert passed["unauthenticated"].split()[2:4] == ["UNAUTHENTICATED", "INVALID_API_KEY"]
    # The client's key on its AuthService stub (through Envoy): known, but not admin.
    assert passed["auth_stub"].split()[2] == "PERMISSION_DENIED"
    # The chat went upstream with the client's own words.
    said = [
        r.body["messages"][-1]["content"]
        for r in ollama.chat_requests
        if r.body["model"] == "llama3.2:latest"
    ]
    assert env["MARIE_PROMPT"] in said
    # The key went on the wire as Envoy expects it (each client has its own key).
    bearer = f"Bearer {env['MARIE_API_KEY']}"
    mine = [call for call in recorder.calls if call.metadata.get("authorization") == bearer]
    deadlines = {call.method: call.deadline_seconds for call in mine}
    assert "/marie.providers.v1.ProviderService/ListModels" in deadlines, recorder.calls
    # Default deadlines: the short one for lookups; the long one for the calls
    # that wait for a model, which a lookup's 10 s would cut off.
    lookup = deadlines["/marie.providers.v1.ProviderService/ListModels"]
    assert lookup is not None and lookup <= 10, deadlines
    assert "/marie.providers.v1.ProviderService/CreateEmbeddings" in deadlines, deadlines
    for method in MODEL_CALLS & deadlines.keys():
        assert (deadlines[method] or 0) > 60, deadlines


def need(language: str, tool: str) -> str:
    """The tool's path, or a skip that names the language left untested and why."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{language} client not tested: {tool} is not installed (.ci/run installs it)")
    return path


def need_version(language: str, tool: str, query: list[str], minimum: tuple[int, ...]) -> str:
    """The tool's path, or a skip naming the version found when it is too old."""
    path = need(language, tool)
    done = subprocess.run([path, *query], capture_output=True, text=True, check=False, timeout=60)
    # The first line of its answer (`java -version` writes to stderr).
    found = next(iter((done.stdout or done.stderr).splitlines()), "no version")
    numbers = tuple(int(n) for n in re.findall(r"\d+", found)[: len(minimum)])
    if numbers < minimum:
        wanted = ".".join(map(str, minimum))
        pytest.skip(
            f"{language} client not tested: {tool} {found.strip()} is older than {wanted}, "
            "which it needs"
        )
    return path


def test_python_client(
    client_env: dict[str, str],
    ollama: FakeOllama,
    recorder: tuple[MetadataRecorder, str],
    tmp_path: Path,
) -> None:
    run(["make", "-s", "clients-python"])
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # Installed from its own package as a user would, not from the workspace.
    run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)])
    run([str(UV), "pip", "install", "-q", "--python", str(python), "./clients/python"])
    output = run([str(python), "clients/python/tests/e2e.py"], env=client_env)
    assert_checks(output, client_env, ollama, recorder[0])


def test_typescript_client(
    client_env: dict[str, str], ollama: FakeOllama, recorder: tuple[MetadataRecorder, str]
) -> None:
    need_version("TypeScript", "node", ["--version"], (20,))
    need("TypeScript", "npm")
    run(["make", "-s", "clients-typescript"])
    output = run(["node", "clients/typescript/test/e2e.mjs"], env=client_env)
    assert_checks(output, client_env, ollama, recorder[0])


def test_go_client(
    client_env: dict[str, str], ollama: FakeOllama, recorder: tuple[MetadataRecorder, str]
) -> None:
    # Go 1.21+ fetches the toolchain go.mod names (1.26) from the module proxy itself.
    go = need_version("Go", "go", ["env", "GOVERSION"], (1, 21))
    # gen/ is committed (Go modules are source); `make clients-check` keeps it current.
    output = run(
        [go, "test", "-count=1", "-v", "-run", "TestE2E", "."],
        env=client_env,
        cwd=ROOT / "clients" / "go",
    )
    assert_checks(output, client_env, ollama, recorder[0])


def test_java_client(
    client_env: dict[str, str], ollama: FakeOllama, recorder: tuple[MetadataRecorder, str]
) -> None:
    need_version("Java", "java", ["-version"], (17,))
    need("Java", "javac")  # a JDK, not only a runtime
    mvn = need("Java", "mvn")
    maven = [mvn, "-T", "1", "-q", "-B", "-ntp", "-Dstyle.color=never", "test"]
    java_dir = ROOT / "clients" / "java"
    # Offline once ~/.m2 holds the build's plugins and libraries: no remote
    # checks on every run. A cold repository fails fast offline; then online.
    offline = subprocess.run(
        [*maven[:1], "-o", *maven[1:]],
        cwd=java_dir,
        env=client_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    if offline.returncode == 0:
        output = offline.stdout
    elif "offline mode" in offline.stdout + offline.stderr:
        output = run(maven, env=client_env, cwd=java_dir)
    else:
        raise AssertionError(
            f"mvn -o test exited {offline.returncode}:\n{offline.stdout}{offline.stderr}"
        )
    assert_checks(output, client_env, ollama, recorder[0])
