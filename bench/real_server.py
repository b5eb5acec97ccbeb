"""Time to first token with a real model server: direct against through Marie.

llama.cpp's llama-server serves SmolLM2-135M-Instruct (the tests' server,
`marie_cli.local_models`), once with one thread and once with a thread per
core; the suite runs with the two as OpenAI-compatible providers `t1` and
`tall`. Each round sends the same streamed chat straight to a server and
through the gateway, alternating which goes first; time to first token is
measured at the client, to the first chunk with content. The prompt is the
same every time, so the server's prompt cache makes the first token one
decode step: what differs between the two paths is what Marie adds, and
with a thread per core, what Marie's own CPU work takes from the server's
threads while they compute. Added = Marie p50 - direct p50 over all pairs,
with the per-round medians beside it (machine noise).

Usage: make bench   (or .venv/bin/python bench/real_server.py --pairs 200)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marie_cli.local_models import LlamaServer

from bench.common import percentile
from tests.stack import start_stack

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
MAX_TOKENS = 4
ROUNDS = 5


def first_token_ms(client: httpx.Client, url: str, body: dict[str, object]) -> float:
    """Milliseconds from sending the request to the first content delta.
    llama-server closes a kept-alive connection after 100 requests: a request
    sent on it as it closes is sent again, and timed from then."""
    try:
        return _first_token_ms(client, url, body)
    except httpx.RemoteProtocolError:
        return _first_token_ms(client, url, body)


def _first_token_ms(client: httpx.Client, url: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    first: float | None = None
    with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = (time.perf_counter() - started) * 1000
    assert first is not None, "no content arrived"
    return first


def _caller(client: httpx.Client, url: str, body: dict[str, object]) -> Callable[[], float]:
    return lambda: first_token_ms(client, url, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=100, help="pairs per server")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "t1": LlamaServer(threads=1, log_path=Path(tmp) / "t1.log"),
            "tall": LlamaServer(threads=cores, log_path=Path(tmp) / "tall.log"),
        }
        for server in servers.values():
            server.start()
        config = Path(tmp) / "marie.yaml"
        config.write_text(
            "providers:\n"
            + "".join(
                f'  {name}: {{type: openai, base_url: "{s.base_url}"}}\n'
                for name, s in servers.items()
            )
        )
        stack = start_stack(Path(tmp) / "data", "http://127.0.0.1:9", MARIE_CONFIG=str(config))
        try:
            key = stack.create_key("bench")
            direct = httpx.Client(timeout=60)
            marie = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"})
            body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
            paths: dict[str, Callable[[], float]] = {}
            for name, s in servers.items():
                paths[f"{name} direct"] = _caller(
                    direct, f"{s.base_url}/chat/completions", {**body, "model": s.model_id}
                )
                paths[f"{name} marie"] = _caller(
                    marie,
                    f"{stack.base_url}/v1/chat/completions",
                    {**body, "model": f"{name}/{s.model_id}"},
                )
            for _ in range(args.warmup):
                for call in paths.values():
                    call()
            samples: dict[str, list[float]] = {p: [] for p in paths}
            rounds: dict[str, list[float]] = {name: [] for name in servers}
            per_round = max(1, args.pairs // ROUNDS)
            for r in range(ROUNDS):
                got: dict[str, list[float]] = {p: [] for p in paths}
                for i in range(per_round):
                    for name in servers:
                        order = ("direct", "marie") if (i + r) % 2 == 0 else ("marie", "direct")
                        for way in order:
                            got[f"{name} {way}"].append(paths[f"{name} {way}"]())
                for p, values in got.items():
                    samples[p] += values
                for name in servers:
                    rounds[name].append(
                        statistics.median(got[f"{name} marie"])
                        - statistics.median(got[f"{name} direct"])
                    )
        finally:
            stack.stop()
            for server in servers.values():
                server.stop()

    n = len(samples["t1 direct"])
    print(
        f"\nTime to first token, llama-server + SmolLM2-135M on {cores} cores, "
        f"{n} interleaved pairs per server in {ROUNDS} rounds\n"
    )
    print(
        f"{'server threads':<16}{'direct p50':>12}{'marie p50':>12}{'added p50':>12}"
        f"{'added p90':>12}  added p50 per round"
    )
    for name in servers:
        d, m = samples[f"{name} direct"], samples[f"{name} marie"]
        label = "1" if name == "t1" else f"{cores} (all)"
        spread = ", ".join(f"{x:+.1f}" for x in rounds[name])
        print(
            f"{label:<16}{statistics.median(d):>10.2f}ms{statistics.median(m):>10.2f}ms"
            f"{statistics.median(m) - statistics.median(d):>+10.2f}ms"
            f"{percentile(m, 0.9) - percentile(d, 0.9):>+10.2f}ms  {spread}"
        )


if __name__ == "__main__":
    main()
