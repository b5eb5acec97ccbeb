"""Tracing's cost on the chat hot path: the same suite with tracing off, on at
100 % and on at 10 % sampling (and, with --baseline-marie, the same three of
another checkout: before a change, side by side with after it), all running
at once against the same fake Ollama,
requests interleaved in batches of ten so that the machine's noise hits every
variant alike. Spans go over OTLP/HTTP to a receiver in a process of its own
(tests/otlp_receiver.py), so exporting is part of the cost measured. CPU is
read from /proc (each thread's schedstat, in ns) for every service process of
each suite (gateway, providers, auth, memory), export threads included, and
shown per service too.

Usage: .venv/bin/python bench/tracing.py [--requests 400]
       .venv/bin/python bench/tracing.py --baseline-marie OTHER_CHECKOUT/.venv/bin/marie
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.stack
from bench.common import cpu_ns, percentile, start_upstreams
from tests.stack import Stack, start_stack

#: The name prefix of the --baseline-marie checkout's suites.
BASELINE = "baseline "
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
RECEIVER = (
    "import sys, time\n"
    "from tests.otlp_receiver import start_receiver\n"
    "r = start_receiver()\n"
    "print(r.endpoint, flush=True)\n"
    "sys.stdin.read()\n"
    "print(len(r.spans), flush=True)\n"
)


def _pids(stack: Stack) -> dict[str, int]:
    return stack.service_pids()


def _bind(call: Callable[[httpx.Client], None], client: httpx.Client) -> Callable[[], None]:
    return lambda: call(client)


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
    parser.add_argument(
        "--baseline-marie",
        type=Path,
        help="the `marie` command of another checkout: its three suites run beside",
    )
    args = parser.parse_args()
    # Six suites start one after the other on a shared machine: slowly when loaded.
    tests.stack.START_TIMEOUT_SECONDS = 300.0

    root = Path(__file__).resolve().parent.parent
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    assert receiver.stdout is not None and receiver.stdin is not None
    endpoint = receiver.stdout.readline().strip()
    upstreams = start_upstreams()
    variants: dict[str, dict[str, str]] = {
        "off": {},
        "on 100%": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        },
        "on 10%": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    }
    stacks: dict[str, Stack] = {}
    # Per mode and variant: latencies, and CPU ms per request by service.
    results: dict[str, dict[str, tuple[list[float], dict[str, float]]]] = {}
    loads: dict[str, tuple[float, float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.baseline_marie is not None:
                own = tests.stack.MARIE
                tests.stack.MARIE = args.baseline_marie
                try:
                    for name, env in variants.items():
                        stacks[f"{BASELINE}{name}"] = start_stack(
                            Path(tmp) / f"base-{name.replace(' ', '')}",
                            upstreams.ollama_url,
                            **env,
                        )
                finally:
                    tests.stack.MARIE = own
            for name, env in variants.items():
                stacks[name] = start_stack(
                    Path(tmp) / name.replace(" ", ""), upstreams.ollama_url, **env
                )
            clients = {
                name: httpx.Client(
                    base_url=stack.base_url,
                    timeout=30,
                    headers={"Authorization": f"Bearer {stack.create_key('bench')}"},
                )
                for name, stack in stacks.items()
            }
            for stream in (False, True):
                body: dict[str, object] = {
                    "model": "ollama/llama3.2:latest",
                    "messages": MESSAGES,
                    "stream": stream,
                }

                def call(client: httpx.Client, body: dict[str, object] = body) -> None:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        for _ in r.iter_bytes():
                            pass

                for client in clients.values():
                    _time(_bind(call, client), args.warmup)
                pids = {name: _pids(stack) for name, stack in stacks.items()}
                samples: dict[str, list[float]] = {name: [] for name in stacks}
                cpu: dict[str, Counter[str]] = {name: Counter() for name in stacks}
                for _ in range(args.requests // 10):
                    for name, client in clients.items():
                        before = {service: cpu_ns(p) for service, p in pids[name].items()}
                        samples[name] += _time(_bind(call, client), 10)
                        for service, p in pids[name].items():
                            cpu[name][service] += cpu_ns(p) - before[service]
                mode = "stream" if stream else "non-stream"
                loads[mode] = os.getloadavg()
                results[mode] = {
                    name: (s, {k: ns / 1e6 / len(s) for k, ns in cpu[name].items()})
                    for name, s in samples.items()
                }
    finally:
        for stack in stacks.values():
            stack.stop()
        upstreams.stop()
        out, _ = receiver.communicate("", timeout=30)
    spans = out.strip().splitlines()[-1] if out.strip() else "?"

    print(f"\nTracing on the chat hot path: {args.requests} requests per variant, interleaved\n")
    print(
        f"{'mode':<12}{'variant':<16}{'p50':>9}{'p90':>9}{'CPU/req':>10}{'CPU vs off':>12}"
        "   by service vs off"
    )
    for mode, by_variant in results.items():
        for name, (s, cpu_ms) in by_variant.items():
            # Against the same checkout's suite with tracing off.
            off_cpu = by_variant[BASELINE + "off" if name.startswith(BASELINE) else "off"][1]
            total, off_total = sum(cpu_ms.values()), sum(off_cpu.values())
            services = " ".join(
                f"{service} {cpu_ms[service] - off_cpu[service]:+.3f}" for service in sorted(cpu_ms)
            )
            print(
                f"{mode:<12}{name:<16}{statistics.median(s):>7.2f}ms"
                f"{percentile(s, 0.9):>7.2f}ms{total:>8.3f}ms{total - off_total:>+10.3f}ms"
                f"   {services}"
            )
        print(f"{'':<12}load average after {mode}: {' '.join(f'{v:.2f}' for v in loads[mode])}")
    print(
        f"\nCPU = gateway + providers + auth + memory, per request, export threads"
        f" included; spans received: {spans}."
    )


if __name__ == "__main__":
    main()
