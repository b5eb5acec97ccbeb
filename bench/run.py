"""Hot-path benchmark: what Marie adds to a chat completion, in latency and CPU.

Baseline and Marie run in the same session against the same fake Ollama (its
own process): the baseline calls Ollama's /api/chat directly; the Marie path
calls the gateway's /v1/chat/completions, which validates the key, calls the
providers service over gRPC, which calls the same upstream. The difference is
what Marie adds. CPU is read from /proc for every Marie process, so it counts
the gateway, providers and auth together. Anthropic's Messages API
(`/v1/messages`, the same call behind another surface) is measured beside the
chat path, interleaved with it.

Usage: make bench   (or .venv/bin/python bench/run.py --requests 500)
       .venv/bin/python bench/run.py --shared-limits   (a key with limits far above
       the load, counted in auth and leased: what `marie up` runs by default)
       .venv/bin/python bench/run.py --local-limits    (the same key, counted in
       each process: MARIE_*_LIMITS=local, the baseline of the lease path)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, percentile, start_upstreams
from tests.stack import Stack, start_stack

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def _marie_pids(stack: Stack) -> dict[str, int]:
    """The service processes (children of `marie up`), by service name."""
    parent = str(stack.process.pid)
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[1] == parent:
            module = next((a.decode() for a in cmdline if a.startswith(b"marie_")), "?")
            pids[module.removeprefix("marie_")] = int(stat.parent.name)
    return pids


def _time(fn: Callable[[], None], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--shared-limits",
        action="store_true",
        help="count limits in auth (leases) and use a key with limits far above the load",
    )
    parser.add_argument(
        "--chat-only",
        action="store_true",
        help="measure the chat path alone (a baseline from before /v1/messages existed)",
    )
    modes.add_argument(
        "--local-limits",
        action="store_true",
        help="count limits in each process and use a key with limits far above the load",
    )
    args = parser.parse_args()

    upstreams = start_upstreams()
    ollama = upstreams.ollama_url
    with tempfile.TemporaryDirectory() as tmp:
        # Default log level: the access log is part of the real per-request cost.
        where = "auth" if args.shared_limits else "local" if args.local_limits else ""
        extra = {f"MARIE_{s}_LIMITS": where for s in ("GATEWAY", "PROVIDERS", "MEMORY") if where}
        stack = start_stack(Path(tmp), ollama, **extra)
        try:
            limited = args.shared_limits or args.local_limits
            limits = ("--rpm", "1000000", "--tpm", "100000000") if limited else ()
            key = stack.create_key("bench", *limits)
            direct = httpx.Client(base_url=ollama, timeout=30)
            marie = httpx.Client(
                base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
            )
            results = {}
            for stream in (False, True):
                direct_body: dict[str, object] = {
                    "model": "llama3.2:latest",
                    "messages": MESSAGES,
                    "stream": stream,
                }
                marie_body: dict[str, object] = {
                    "model": "ollama/llama3.2:latest",
                    "messages": MESSAGES,
                    "stream": stream,
                }

                def call_direct(body: dict[str, object] = direct_body) -> None:
                    with direct.stream("POST", "/api/chat", json=body) as r:
                        r.raise_for_status()
                        for _ in r.iter_bytes():
                            pass

                messages_body: dict[str, object] = {**marie_body, "max_tokens": 64}

                def call_marie(body: dict[str, object] = marie_body) -> None:
                    with marie.stream("POST", "/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        for _ in r.iter_bytes():
                            pass

                def call_messages(body: dict[str, object] = messages_body) -> None:
                    with marie.stream("POST", "/v1/messages", json=body) as r:
                        r.raise_for_status()
                        for _ in r.iter_bytes():
                            pass

                _time(call_direct, args.warmup)
                _time(call_marie, args.warmup)
                if not args.chat_only:
                    _time(call_messages, args.warmup)
                pids = _marie_pids(stack)
                cpu = {"chat": dict.fromkeys(pids, 0.0), "messages": dict.fromkeys(pids, 0.0)}

                def measured(
                    path: str,
                    fn: Callable[[], None],
                    pids: dict[str, int] = pids,
                    cpu: dict[str, dict[str, float]] = cpu,
                ) -> list[float]:
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    samples = _time(fn, 10)
                    for name, pid in pids.items():
                        cpu[path][name] += cpu_seconds(pid) - before[name]
                    return samples

                # Interleave the three so machine noise hits all alike.
                d, m, a = [], [], []
                for _ in range(args.requests // 10):
                    d += _time(call_direct, 10)
                    m += measured("chat", call_marie)
                    if not args.chat_only:
                        a += measured("messages", call_messages)
                mode = "stream" if stream else "non-stream"
                for path, samples in (("chat", m), ("messages", a)):
                    if not samples:
                        continue
                    cpu_ms = {n: s * 1000 / len(samples) for n, s in cpu[path].items()}
                    results[f"{mode} {path}"] = (d, samples, cpu_ms)
        finally:
            stack.stop()
            upstreams.stop()

    what = (
        ", limits leased from auth"
        if args.shared_limits
        else ", limits counted in each process"
        if args.local_limits
        else ""
    )
    print(f"\nMarie hot-path benchmark: {args.requests} requests per path, sequential{what}\n")
    header = f"{'mode':<20}{'direct p50':>12}{'marie p50':>12}{'added p50':>12}"
    header += f"{'direct p90':>12}{'marie p90':>12}{'ratio p50':>11}{'marie CPU/req':>15}"
    print(header)
    for mode, (d, m, cpu_ms) in results.items():
        dp50, mp50 = statistics.median(d), statistics.median(m)
        total_cpu = sum(cpu_ms.values())
        print(
            f"{mode:<20}{dp50:>10.2f}ms{mp50:>10.2f}ms{mp50 - dp50:>10.2f}ms"
            f"{percentile(d, 0.9):>10.2f}ms{percentile(m, 0.9):>10.2f}ms{mp50 / dp50:>10.2f}x"
            f"{total_cpu:>13.2f}ms"
        )
        split = ", ".join(f"{name} {ms:.2f}ms" for name, ms in sorted(cpu_ms.items()))
        print(f"{'':<20}CPU per request by service: {split}")
    print(
        "\nadded = Marie p50 - direct p50; CPU = gateway + providers + auth, per request;"
        "\nchat = /v1/chat/completions, messages = /v1/messages (Anthropic's API)."
    )


if __name__ == "__main__":
    main()
