"""What the benchmarks share: process accounting from /proc, CPU pinning, the
fake upstreams in a process of their own, and percentiles.

Everything here reads Linux's /proc; the benchmarks run on Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
