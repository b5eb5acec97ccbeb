"""What the benchmarks share: process accounting from /proc, CPU pinning, the
fake upstreams in a process of their own, and percentiles.

Everything here reads Linux's /proc; the benchmarks run on Linux only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.stack import MARIE, START_TIMEOUT_SECONDS, Stack, free_ports

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The fake OpenAI-compatible server's key (tests/fakes/upstream.py).
UPSTREAM_KEY = "test-key"
# A reply long enough to measure chunk relay: one streamed chunk per word.
LONG_REPLY_WORDS = 400


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """Nanoseconds of CPU the live threads of a process have run, from each
    one's /proc/<pid>/task/<tid>/schedstat: exact, where `cpu_seconds` counts
    in clock ticks (10 ms, as much as a few requests' work). A thread that
    exits between two readings takes its time with it: measure processes
    whose threads live (the services' do)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of one process."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pin(pids: list[int], cpus: set[int]) -> None:
    """Pin every thread of these processes to `cpus` (threads started later
    inherit the mask of the thread that starts them)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError):
                continue


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..1."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Upstreams:
    """The fake Ollama and the fake OpenAI-compatible server, in one process."""

    process: subprocess.Popen[bytes]
    ollama_url: str
    openai_url: str  # ends in /v1

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


_UPSTREAMS_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from tests.fakes import FakeOllama, FakeModel, default_models
from tests.fakes.openai_server import FakeOpenAI, FakeChatModel
words = int(sys.argv[2])
long_reply = " ".join(f"w{i}" for i in range(words))
ollama = FakeOllama(default_models() + [FakeModel(name="bench-long:latest", reply=long_reply)])
ollama.start()
openai = FakeOpenAI([FakeChatModel("bench-small"), FakeChatModel("bench-long", reply=long_reply)])
openai.start()
print(json.dumps({"ollama": ollama.base_url, "openai": openai.base_url + "/v1"}), flush=True)
while True:  # the fakes record every request: forget them, or a long run grows
    time.sleep(2)
    ollama.reset()
    openai.reset()
"""


def start_upstreams(cpus: set[int] | None = None) -> Upstreams:
    """Start both fakes in their own process (so their CPU is not Marie's)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _UPSTREAMS_SCRIPT, str(ROOT), str(LONG_REPLY_WORDS)],
        stdout=subprocess.PIPE,
    )
    if cpus:
        pin([process.pid], cpus)
    assert process.stdout is not None
    urls = json.loads(process.stdout.readline())
    return Upstreams(process, urls["ollama"], urls["openai"])


# What a person's shell passes to `marie up`; nothing else of the benchmark's
# own environment reaches the measured suite.
USER_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER")


def start_suite_as_user(data_dir: Path, cpus: set[int], **settings: str) -> Stack:
    """`marie up` as a person runs it: `taskset -c <cpus> marie up` from a
    plain shell environment plus `settings`, so every service is on `cpus`
    from its first instruction and no variable of the benchmark's driver (or
    of whoever started it) changes what is measured."""
    gateway, providers, auth, memory = free_ports(4)
    env = {name: os.environ[name] for name in USER_VARIABLES if name in os.environ}
    env |= {
        "MARIE_DATA_DIR": str(data_dir),
        "MARIE_GATEWAY_PORT": str(gateway),
        "MARIE_PROVIDERS_PORT": str(providers),
        "MARIE_AUTH_PORT": str(auth),
        "MARIE_MEMORY_PORT": str(memory),
        **settings,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "marie-up.log"
    core_list = ",".join(map(str, sorted(cpus)))
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            ["taskset", "-c", core_list, str(MARIE), "up"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
        )
    stack = Stack(process, env, log_path, gateway, providers, auth, memory)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"marie up exited with {process.returncode}:\n{stack.log()}")
        if "Marie is up." in stack.log():
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{stack.base_url}/readyz", timeout=1).status_code == 200:
                    return stack
        time.sleep(0.1)
    stack.stop()
    raise RuntimeError(f"marie up not ready after {START_TIMEOUT_SECONDS}s:\n{stack.log()}")
