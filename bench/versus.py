"""Marie against LiteLLM proxy: the same mock upstream, the same load tool, one run.

Both gateways serve the same two upstreams (the fake Ollama and the fake
OpenAI-compatible server from tests/fakes, in a process of their own), with the
same request bodies, pinned to the same CPU core; the load tool, the upstreams
and this driver run on the other core. Runs alternate between the gateways
round by round, so machine noise falls on both alike, and every figure is
reported with its min-max over the rounds.

- wrk (Debian's `wrk`) measures non-streaming latency and throughput at fixed
  concurrencies; the upstream called directly at concurrency 1 is the baseline
  that "added latency" subtracts.
- A Python client measures what wrk cannot: time to first token of streamed
  answers, and the relay rate of a long stream (chunks per second, CPU per
  chunk).
- CPU comes from /proc for every process of each gateway (Marie: gateway,
  providers, auth, memory and the `marie up` supervisor; LiteLLM: its proxy).
- `--soak-minutes N` also drives both at a steady rate and samples RSS.

LiteLLM lives in a virtual environment of the benchmark's own (`.venv-bench`,
from bench/versus/requirements.txt), never in Marie's dependencies. It runs with
its production recommendations for one core: one worker, no database, no
callbacks, retries off, logs at ERROR, the local model-cost map (no network).

Usage: make bench-compare   (writes docs/benchmarks.md and its plots)
       .venv/bin/python bench/versus.py --litellm .venv-bench/bin/litellm --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import grpc_floor
from bench.common import (
    LONG_REPLY_WORDS,
    ROOT,
    UPSTREAM_KEY,
    Upstreams,
    cpu_seconds,
    pin,
    process_tree,
    rss_bytes,
    start_suite_as_user,
    start_upstreams,
)
from tests.stack import Stack, free_ports

MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
LITELLM_KEY = "sk-bench-litellm-master"
WRK_SCRIPT = ROOT / "bench" / "post.lua"
# Streamed answers: the first chunk carrying text (SSE or Ollama NDJSON).
FIRST_TEXT = re.compile(rb'"(?:content|response)":\s*"[^"]')

GATEWAY_CPU = {0}
LOAD_CPU = {1}


@dataclass(frozen=True)
class Dialect:
    """One upstream protocol: how to call it directly and through a gateway."""

    name: str
    model: str  # the id both gateways serve
    long_model: str
    direct_url: str
    direct_model: str
    direct_long_model: str
    direct_auth: str | None

    def direct_body(self, *, stream: bool, long: bool = False) -> dict[str, Any]:
        model = self.direct_long_model if long else self.direct_model
        return {"model": model, "messages": MESSAGES, "stream": stream}

    def gateway_body(self, *, stream: bool, long: bool = False) -> dict[str, Any]:
        model = self.long_model if long else self.model
        return {"model": model, "messages": MESSAGES, "stream": stream}


@dataclass
class Target:
    """Something to send chat requests to: a gateway, or the upstream itself."""

    name: str
    url: str  # the chat endpoint
    auth: str | None
    processes: Callable[[], dict[str, int]] = field(default=dict)

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.processes().items()}

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.processes().values())


# ------------------------------------------------------------------ gateways


def marie_config(upstreams: Upstreams, path: Path) -> Path:
    path.write_text(
        "providers:\n"
        f"  ollama: {{type: ollama, base_url: '{upstreams.ollama_url}'}}\n"
        f"  oai: {{type: openai, base_url: '{upstreams.openai_url}',"
        " api_key_env: BENCH_UPSTREAM_KEY, models: [bench-small, bench-long]}\n"
    )
    return path


def litellm_config(upstreams: Upstreams, path: Path) -> Path:
    models = []
    for name, target in (("llama3.2:latest", "llama3.2:latest"), ("bench-long:latest", None)):
        models.append(
            {
                "model_name": f"ollama/{name}",
                "litellm_params": {
                    "model": f"ollama_chat/{target or name}",
                    "api_base": upstreams.ollama_url,
                },
            }
        )
    for name in ("bench-small", "bench-long"):
        models.append(
            {
                "model_name": f"oai/{name}",
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": upstreams.openai_url,
                    "api_key": UPSTREAM_KEY,
                },
            }
        )
    config = {
        "model_list": models,
        "litellm_settings": {
            "num_retries": 0,
            "request_timeout": 60,
            "set_verbose": False,
            "json_logs": False,
            "callbacks": [],
            "telemetry": False,
        },
        "router_settings": {"num_retries": 0},
        "general_settings": {
            "master_key": LITELLM_KEY,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "background_health_checks": False,
        },
    }
    # JSON is YAML: no YAML writer needed here.
    path.write_text(json.dumps(config, indent=2))
    return path


@contextmanager
def run_marie(upstreams: Upstreams, tmp: Path) -> Iterator[Target]:
    config = marie_config(upstreams, tmp / "marie.yaml")
    stack = start_suite_as_user(
        tmp / "marie", GATEWAY_CPU, MARIE_CONFIG=str(config), BENCH_UPSTREAM_KEY=UPSTREAM_KEY
    )
    try:
        key = stack.create_key("bench")

        def processes(stack: Stack = stack) -> dict[str, int]:
            return {"up": stack.process.pid, **stack.service_pids()}

        yield Target("marie", f"{stack.base_url}/v1/chat/completions", f"Bearer {key}", processes)
    except BaseException:
        print(f"marie up's log, last lines:\n{stack.log()[-4000:]}", flush=True)
        raise
    finally:
        stack.stop()


@contextmanager
def run_litellm(litellm: Path, upstreams: Upstreams, tmp: Path) -> Iterator[Target]:
    config = litellm_config(upstreams, tmp / "litellm.yaml")
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MODE": "PRODUCTION",
        "NO_DOCS": "True",
    }
    env.pop("DATABASE_URL", None)
    log = (tmp / "litellm.log").open("wb")
    process = subprocess.Popen(
        [
            str(litellm),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"LiteLLM exited:\n{(tmp / 'litellm.log').read_text()}")
            try:
                if httpx.get(f"{base}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("LiteLLM not ready after 120 s")
            time.sleep(0.5)
        pin(process_tree(process.pid), GATEWAY_CPU)

        def processes() -> dict[str, int]:
            return {f"litellm[{pid}]": pid for pid in process_tree(process.pid)}

        yield Target("litellm", f"{base}/v1/chat/completions", f"Bearer {LITELLM_KEY}", processes)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def litellm_version(litellm: Path) -> str:
    python = litellm.parent / "python"
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# ---------------------------------------------------------------- measuring


def wrk(target: Target, body: dict[str, Any], connections: int, seconds: int) -> dict[str, Any]:
    """One wrk run; the summary the Lua script prints, plus CPU per request."""
    env = {**os.environ, "BENCH_BODY": json.dumps(body), "BENCH_AUTH": target.auth or ""}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    command += ["-s", str(WRK_SCRIPT), target.url]
    if len(os.sched_getaffinity(0)) > 1 or os.sched_getaffinity(0) >= LOAD_CPU:
        command = ["taskset", "-c", ",".join(map(str, sorted(LOAD_CPU))), *command]
    before = target.cpu()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    after = target.cpu()
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(result[k] for k in result if k.endswith("_errors")) + result["timeouts"]
    requests = max(1, result["requests"])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["success"] = 1 - errors / requests
    result["cpu_ms_per_request"] = {
        name: (after[name] - before[name]) * 1000 / requests for name in before if name in after
    }
    return result


def stream_once(client: httpx.Client, target: Target, body: dict[str, Any]) -> tuple[float, float]:
    """(time to first text, total time) of one streamed answer, in ms."""
    headers = {"Authorization": target.auth} if target.auth else {}
    started = time.perf_counter()
    first = None
    with client.stream("POST", target.url, json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{target.name}: {response.status_code} {response.text[:500]}")
        for piece in response.iter_raw():
            if first is None and FIRST_TEXT.search(piece):
                first = time.perf_counter()
    ended = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{target.name}: a streamed answer without text")
    return (first - started) * 1000, (ended - started) * 1000


def ttft(
    targets: list[tuple[Target, dict[str, Any]]], count: int, failures: dict[str, int]
) -> dict[str, list[float]]:
    """Time to first token, sequentially, interleaved in blocks of ten. A
    call that fails is counted in `failures` (and said), not timed."""
    samples: dict[str, list[float]] = {t.name: [] for t, _ in targets}

    def once(target: Target, body: dict[str, Any]) -> float | None:
        try:
            return stream_once(client, target, body)[0]
        except (RuntimeError, httpx.HTTPError) as exc:
            failures[target.name] = failures.get(target.name, 0) + 1
            print(f"    {target.name}: a streamed call failed: {exc}", flush=True)
            return None

    with httpx.Client(timeout=30) as client:
        for target, body in targets:  # warm-up
            for _ in range(10):
                once(target, body)
        for _ in range(max(1, count // 10)):
            for target, body in targets:
                for _ in range(10):
                    if (first := once(target, body)) is not None:
                        samples[target.name].append(first)
    return samples


def relay(target: Target, body: dict[str, Any], count: int) -> dict[str, float]:
    """A long streamed answer, `count` times: upstream chunks relayed per second
    and CPU per chunk."""
    with httpx.Client(timeout=60) as client:
        stream_once(client, target, body)
        before = target.cpu()
        started = time.perf_counter()
        for _ in range(count):
            stream_once(client, target, body)
        elapsed = time.perf_counter() - started
        after = target.cpu()
    chunks = LONG_REPLY_WORDS * count
    cpu = sum(after[n] - before[n] for n in before if n in after)
    return {"chunks_per_s": chunks / elapsed, "cpu_us_per_chunk": cpu * 1e6 / chunks}


def soak(
    targets: list[tuple[Target, dict[str, Any]]], minutes: float, rate: float
) -> dict[str, Any]:
    """Both gateways at a steady rate side by side; RSS sampled every 5 s."""
    stop = threading.Event()
    failures: dict[str, int] = {t.name: 0 for t, _ in targets}

    def drive(target: Target, body: dict[str, Any]) -> None:
        headers = {"Authorization": target.auth} if target.auth else {}
        with httpx.Client(timeout=30) as client:
            next_at = time.monotonic()
            while not stop.is_set():
                try:
                    client.post(target.url, json=body, headers=headers).raise_for_status()
                except httpx.HTTPError:
                    failures[target.name] += 1
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=drive, args=pair, daemon=True) for pair in targets]
    for thread in threads:
        thread.start()
    series: dict[str, list[tuple[float, int]]] = {t.name: [] for t, _ in targets}
    started = time.monotonic()
    while time.monotonic() - started < minutes * 60:
        for target, _ in targets:
            series[target.name].append((time.monotonic() - started, target.rss()))
        time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join()
    result = {}
    warm = min(60.0, minutes * 6)  # growth is counted after the first minute (or 10 %)
    for name, points in series.items():
        after_warmup = [rss for t, rss in points if t >= warm] or [points[-1][1]]
        result[name] = {
            "rss_start_mb": after_warmup[0] / 2**20,
            "rss_end_mb": after_warmup[-1] / 2**20,
            "growth_mb": (after_warmup[-1] - after_warmup[0]) / 2**20,
            "failures": failures[name],
            "series": [(t, rss / 2**20) for t, rss in points],
        }
    return result


# ------------------------------------------------------------------- driver


def measure_dialect(
    dialect: Dialect, marie: Target, litellm: Target, args: argparse.Namespace
) -> dict[str, Any]:
    direct = Target("direct", dialect.direct_url, dialect.direct_auth)
    gateways = [marie, litellm]
    whole = {"stream": False}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.name: {str(c): [] for c in args.concurrency} for t in [direct, *gateways]
    }
    for target in [direct, *gateways]:  # warm-up
        wrk(target, _body(dialect, target, **whole), 4, 2)
    for round_ in range(args.rounds):
        order = gateways if round_ % 2 == 0 else gateways[::-1]
        print(f"  {dialect.name}: round {round_ + 1}/{args.rounds}", flush=True)
        runs["direct"]["1"].append(wrk(direct, _body(dialect, direct, **whole), 1, args.seconds))
        for c in args.concurrency:
            for target in order:
                runs[target.name][str(c)].append(
                    wrk(target, _body(dialect, target, **whole), c, args.seconds)
                )
    print(f"  {dialect.name}: time to first token", flush=True)
    stream_targets = [(t, _body(dialect, t, stream=True)) for t in [direct, *gateways]]
    failures: dict[str, int] = {}
    first_token = ttft(stream_targets, args.ttft_requests, failures)
    print(f"  {dialect.name}: stream relay", flush=True)
    relays = {
        t.name: [relay(t, _body(dialect, t, stream=True, long=True), args.relay_requests)]
        for t in gateways
    }
    for _ in range(args.rounds - 1):
        for t in gateways[::-1]:
            relays[t.name].append(
                relay(t, _body(dialect, t, stream=True, long=True), args.relay_requests)
            )
    return {"wrk": runs, "ttft_ms": first_token, "ttft_failures": failures, "relay": relays}


def _body(dialect: Dialect, target: Target, *, stream: bool, long: bool = False) -> dict[str, Any]:
    if target.name == "direct":
        return dialect.direct_body(stream=stream, long=long)
    return dialect.gateway_body(stream=stream, long=long)


def machine() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    wrk_version = subprocess.run(
        ["wrk", "-v"], check=False, capture_output=True, text=True
    ).stdout.split("\n")[0]
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "load_before": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version.split(" Copyright")[0].strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--litellm", type=Path, required=True, help="the litellm executable")
    parser.add_argument("--plot-python", type=Path, help="a Python with matplotlib, for the plots")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32, 128])
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--relay-requests", type=int, default=10)
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--soak-rate", type=float, default=50.0, help="requests/s per gateway")
    parser.add_argument("--dialects", nargs="*", default=["ollama", "openai"])
    parser.add_argument(
        "--soak-results",
        type=Path,
        help="take the soak from this earlier run's results.json (its own date and command"
        " are reported with it): the soak measures memory, which other load does not disturb",
    )
    parser.add_argument(
        "--no-memory-search", action="store_true", help="skip bench/memory_search.py"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk (Debian's package)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("the comparison needs two cores: one for the gateways, one for the load")
    os.sched_setaffinity(0, LOAD_CPU)

    info = machine()
    info["litellm"] = litellm_version(args.litellm)
    info["command"] = " ".join(["bench/versus.py", *sys.argv[1:]])
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.dialects:
        print("measuring the bare gRPC floor", flush=True)
        results["grpc_floor"] = grpc_floor.measure(3000, GATEWAY_CPU)
    upstreams = start_upstreams(LOAD_CPU)
    dialects = {
        "ollama": Dialect(
            "ollama",
            "ollama/llama3.2:latest",
            "ollama/bench-long:latest",
            f"{upstreams.ollama_url}/api/chat",
            "llama3.2:latest",
            "bench-long:latest",
            None,
        ),
        "openai": Dialect(
            "openai",
            "oai/bench-small",
            "oai/bench-long",
            f"{upstreams.openai_url}/chat/completions",
            "bench-small",
            "bench-long",
            f"Bearer {UPSTREAM_KEY}",
        ),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            with (
                run_marie(upstreams, tmp) as marie,
                run_litellm(args.litellm, upstreams, tmp) as litellm,
            ):
                for name in args.dialects:
                    print(f"measuring the {name} dialect", flush=True)
                    results[name] = measure_dialect(dialects[name], marie, litellm, args)
                if args.soak_minutes > 0:
                    print(f"soak: {args.soak_minutes} min at {args.soak_rate}/s each", flush=True)
                    body = dialects["ollama"].gateway_body(stream=False)
                    results["soak"] = soak(
                        [(marie, body), (litellm, body)], args.soak_minutes, args.soak_rate
                    )
                    results["soak_run"] = {
                        "date": info["date"],
                        "command": info["command"],
                        "minutes": args.soak_minutes,
                        "rate": args.soak_rate,
                    }
    finally:
        upstreams.stop()
    if args.soak_results and "soak" not in results:
        earlier = json.loads(args.soak_results.read_text())
        results["soak"] = earlier["soak"]
        results["soak_run"] = earlier["soak_run"]
    if not args.no_memory_search:
        memory = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "memory_search.py")],
            check=False,
            capture_output=True,
            text=True,
        )
        results["memory_search"] = memory.stdout.strip() if memory.returncode == 0 else None
    info["load_after"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    from bench.report import write_report  # noqa: PLC0415

    report = write_report(results, args.out, args.out.parent / "benchmarks.md")
    print(report)
    if args.plot_python:
        subprocess.run(
            [str(args.plot_python), str(ROOT / "bench" / "plots.py"), str(args.out)], check=True
        )


if __name__ == "__main__":
    main()
