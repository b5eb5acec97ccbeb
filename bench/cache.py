"""Response cache benchmark: a hit against a miss, on the fake Ollama.

One `marie up` suite (gateway, auth, providers with its SQLite cache) and the
fake Ollama in its own process, as `bench/run.py` runs them. Interleaved, ten
at a time, so machine noise hits all alike:

- uncached: chat that does not ask for the cache (the default);
- miss: chat with `Cache-Control: no-cache` (calls the upstream, stores the
  answer: the whole cost of a miss);
- hit: chat with `Cache-Control: max-age=3600` (answered from the cache);

and the same for embeddings (default: cached; `no-cache` for the miss, `no-store`
for uncached). CPU is read from /proc for every Marie process.

Usage: make bench   (or .venv/bin/python bench/cache.py --requests 400)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, percentile, start_upstreams
from bench.run import _marie_pids, _time
from tests.stack import Stack, start_stack

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()

    upstreams = start_upstreams()
    rows: list[tuple[str, list[float], float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), upstreams.ollama_url)
        try:
            key = stack.create_key("bench-cache")
            marie = httpx.Client(
                base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
            )
            for stream in (False, True):
                chat: dict[str, object] = {
                    "model": "ollama/llama3.2:latest",
                    "messages": MESSAGES,
                    "stream": stream,
                }
                mode = "stream" if stream else "non-stream"
                paths: dict[str, tuple[str, dict[str, object], dict[str, str]]] = {
                    f"{mode} chat uncached": ("/v1/chat/completions", chat, {}),
                    f"{mode} chat miss": (
                        "/v1/chat/completions",
                        chat,
                        {"Cache-Control": "no-cache"},
                    ),
                    f"{mode} chat hit": (
                        "/v1/chat/completions",
                        chat,
                        {"Cache-Control": "max-age=3600"},
                    ),
                }
                rows += _measure(stack, marie, paths, args)
            embed: dict[str, object] = {
                "model": "ollama/llama3.2:latest",
                "input": ["hello there, five words"],
            }
            rows += _measure(
                stack,
                marie,
                {
                    "embeddings uncached": ("/v1/embeddings", embed, {"Cache-Control": "no-store"}),
                    "embeddings miss": ("/v1/embeddings", embed, {"Cache-Control": "no-cache"}),
                    "embeddings hit": ("/v1/embeddings", embed, {}),
                },
                args,
            )
        finally:
            stack.stop()
            upstreams.stop()

    print(f"\nResponse cache benchmark: {args.requests} requests per path, sequential\n")
    print(f"{'path':<26}{'p50':>10}{'p90':>10}{'CPU/req':>10}")
    for name, samples, cpu_ms in rows:
        print(
            f"{name:<26}{statistics.median(samples):>8.2f}ms"
            f"{percentile(samples, 0.9):>8.2f}ms{cpu_ms:>8.2f}ms"
        )
    print(
        "\nmiss = Cache-Control: no-cache (upstream call + store); hit = answered from the"
        "\ncache; CPU = gateway + providers + auth, per request."
    )


def _caller(
    client: httpx.Client, path: str, body: dict[str, object], headers: dict[str, str]
) -> Callable[[], None]:
    def call() -> None:
        with client.stream("POST", path, json=body, headers=headers) as r:
            r.raise_for_status()
            for _ in r.iter_bytes():
                pass

    return call


def _measure(
    stack: Stack,
    client: httpx.Client,
    paths: dict[str, tuple[str, dict[str, object], dict[str, str]]],
    args: argparse.Namespace,
) -> list[tuple[str, list[float], float]]:
    calls = {
        name: _caller(client, path, body, headers) for name, (path, body, headers) in paths.items()
    }
    for call in calls.values():
        _time(call, args.warmup)
    pids = _marie_pids(stack)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
    for _ in range(args.requests // 10):
        for name, call in calls.items():
            before = sum(cpu_seconds(pid) for pid in pids.values())
            samples[name] += _time(call, 10)
            cpu[name] += sum(cpu_seconds(pid) for pid in pids.values()) - before
    return [(name, samples[name], cpu[name] * 1000 / len(samples[name])) for name in calls]


if __name__ == "__main__":
    main()
