"""docs/benchmarks.md from the results of bench/versus.py (results.json)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

GATEWAYS = ("marie", "litellm")
DIALECT_TITLES = {"ollama": "Ollama dialect", "openai": "OpenAI-compatible dialect"}


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Median, with min-max over the rounds when there is more than one."""
    middle = fmt.format(statistics.median(values))
    if len(values) < 2:
        return middle
    return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _ratio(numerator: list[float], denominator: list[float]) -> str:
    below = statistics.median(denominator)
    return f"{statistics.median(numerator) / below:.1f}x" if below > 0 else "-"


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def added_latency(runs: dict[str, Any], gateway: str, point: str) -> list[float]:
    """Per round: the gateway's percentile minus the upstream's, in ms (wrk, c=1)."""
    direct = runs["direct"]["1"]
    return [
        (run["latency_us"][point] - base["latency_us"][point]) / 1000
        for run, base in zip(runs[gateway]["1"], direct, strict=False)
    ]


def cpu_per_request(runs: dict[str, Any], gateway: str, concurrency: str) -> list[float]:
    return [sum(run["cpu_ms_per_request"].values()) for run in runs[gateway][concurrency]]


def dialect_section(name: str, data: dict[str, Any]) -> list[str]:
    runs = data["wrk"]
    levels = sorted(runs["marie"], key=int)
    out = [f"## {DIALECT_TITLES.get(name, name)}", ""]

    out += [
        "### Added latency at concurrency 1 (ms; gateway minus the upstream called directly)",
        "",
        "| measure | Marie | LiteLLM | LiteLLM / Marie |",
        "|---|---|---|---|",
    ]
    for label, point in (
        ("non-stream p50", "50"),
        ("non-stream p95", "95"),
        ("non-stream p99", "99"),
    ):
        marie, litellm = added_latency(runs, "marie", point), added_latency(runs, "litellm", point)
        out.append(
            f"| {label} | {_spread(marie)} | {_spread(litellm)} | {_ratio(litellm, marie)} |"
        )
    ttft = data["ttft_ms"]
    for label, q in (("time to first token p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        base = _pct(ttft["direct"], q)
        m_first, l_first = _pct(ttft["marie"], q) - base, _pct(ttft["litellm"], q) - base
        out.append(
            f"| {label} | {m_first:.2f} | {l_first:.2f} | "
            f"{f'{l_first / m_first:.1f}x' if m_first > 0 else '-'} |"
        )
    out.append("")

    out += [
        *(
            [
                "Streamed calls that failed (not timed): "
                + ", ".join(f"{k} {v}" for k, v in sorted(data["ttft_failures"].items())),
                "",
            ]
            if data.get("ttft_failures")
            else []
        ),
        "### CPU per request, all of each gateway's processes (ms)",
        "",
        "| concurrency | Marie | LiteLLM | LiteLLM / Marie | Marie by process (median) |",
        "|---|---|---|---|---|",
    ]
    for c in levels:
        marie, litellm = cpu_per_request(runs, "marie", c), cpu_per_request(runs, "litellm", c)
        split = {
            process: statistics.median(
                run["cpu_ms_per_request"].get(process, 0.0) for run in runs["marie"][c]
            )
            for process in runs["marie"][c][0]["cpu_ms_per_request"]
        }
        by_process = ", ".join(f"{p} {ms:.2f}" for p, ms in sorted(split.items()))
        ratio = _ratio(litellm, marie)
        out.append(f"| {c} | {_spread(marie)} | {_spread(litellm)} | {ratio} | {by_process} |")
    out.append("")

    out += [
        "### Throughput (wrk, non-streaming, gateways on one core)",
        "",
        "| concurrency | Marie req/s | LiteLLM req/s | Marie / LiteLLM | Marie p50 / p99 ms"
        " | LiteLLM p50 / p99 ms | success Marie / LiteLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        m, lt = runs["marie"][c], runs["litellm"][c]
        m_rps, l_rps = [r["rps"] for r in m], [r["rps"] for r in lt]

        def lat(rs: list[dict[str, Any]]) -> str:
            p50 = statistics.median(r["latency_us"]["50"] for r in rs) / 1000
            p99 = statistics.median(r["latency_us"]["99"] for r in rs) / 1000
            return f"{p50:.2f} / {p99:.2f}"

        success = f"{min(r['success'] for r in m):.2%} / {min(r['success'] for r in lt):.2%}"
        out.append(
            f"| {c} | {_spread(m_rps, '{:.0f}')} | {_spread(l_rps, '{:.0f}')}"
            f" | {_ratio(m_rps, l_rps)} | {lat(m)} | {lat(lt)} | {success} |"
        )
    best = {}
    for gateway in GATEWAYS:
        ok = [
            statistics.median(r["rps"] for r in runs[gateway][c])
            for c in levels
            if all(r["success"] >= 0.999 for r in runs[gateway][c])
        ]
        best[gateway] = max(ok) if ok else 0.0
    out += [
        "",
        f"Highest rate with ≥ 99.9 % success: Marie {best['marie']:.0f} req/s, "
        f"LiteLLM {best['litellm']:.0f} req/s"
        + (f" ({best['marie'] / best['litellm']:.1f}x)." if best["litellm"] else "."),
        "",
    ]

    relay = data["relay"]
    out += targets(runs, data, best["marie"])
    out += [
        "### Streaming relay (one long answer at a time, one upstream chunk per word)",
        "",
        "| measure | Marie | LiteLLM | advantage |",
        "|---|---|---|---|",
    ]
    m_rate = [r["chunks_per_s"] for r in relay["marie"]]
    l_rate = [r["chunks_per_s"] for r in relay["litellm"]]
    m_cpu = [r["cpu_us_per_chunk"] for r in relay["marie"]]
    l_cpu = [r["cpu_us_per_chunk"] for r in relay["litellm"]]
    out.append(
        f"| chunks/s, one stream | {_spread(m_rate, '{:.0f}')} | {_spread(l_rate, '{:.0f}')}"
        f" | {_ratio(m_rate, l_rate)} faster |"
    )
    out.append(
        f"| CPU µs per chunk | {_spread(m_cpu, '{:.1f}')} | {_spread(l_cpu, '{:.1f}')}"
        f" | {_ratio(l_cpu, m_cpu)} less |"
    )
    out += ["", f"![latency CDF](benchmarks/latency-{name}.png)", ""]
    out += [f"![throughput](benchmarks/throughput-{name}.png)", ""]
    return out


def targets(runs: dict[str, Any], data: dict[str, Any], best_rps: float) -> list[str]:
    """Marie against the hot-path targets (issue 11), medians over the rounds."""
    ttft = data["ttft_ms"]

    def first_token(q: float) -> float:
        return _pct(ttft["marie"], q) - _pct(ttft["direct"], q)

    cpu_chunk_ms = statistics.median(r["cpu_us_per_chunk"] for r in data["relay"]["marie"]) / 1000
    rows = [
        (
            "added latency p50, non-stream",
            statistics.median(added_latency(runs, "marie", "50")),
            1.0,
        ),
        (
            "added latency p99, non-stream",
            statistics.median(added_latency(runs, "marie", "99")),
            3.0,
        ),
        ("added time to first token p50", first_token(0.5), 1.0),
        ("added time to first token p99", first_token(0.99), 3.0),
        (
            "CPU per request, ms (concurrency 1)",
            statistics.median(cpu_per_request(runs, "marie", "1")),
            1.0,
        ),
        ("CPU per streamed chunk, ms", cpu_chunk_ms, 0.03),
    ]
    out = [
        "### Marie against the hot-path targets",
        "",
        "| measure | target | measured | met |",
        "|---|---|---|---|",
    ]
    for label, value, limit in rows:
        out.append(
            f"| {label} | <= {limit:g} | {value:.3f} | {'yes' if value <= limit else 'no'} |"
        )
    out += [
        f"| requests/s on one core | >= 900 | {best_rps:.0f}"
        f" | {'yes' if best_rps >= 900 else 'no'} |",
        "",
    ]
    return out


def floor_section(floor: dict[str, dict[str, float]]) -> list[str]:
    """What one bare grpc.aio call costs (bench/grpc_floor.py): the floor under the
    CPU targets, since Marie's chat path makes one gateway -> providers call."""
    out = [
        "## The floor: one bare gRPC call",
        "",
        "Marie's gateway reaches providers with one gRPC call per chat request: unary",
        "(`CreateChatCompletion`) for a whole reply, server-streaming for a stream. The same",
        "calls with nothing around them (grpc.aio on uvloop at both ends, one ~300-byte reply,",
        "server on core 0, client on core 1; bench/grpc_floor.py):",
        "",
        "| call | server CPU ms | client CPU ms | together | wall ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in floor.items():
        together = row["server_cpu_ms"] + row["client_cpu_ms"]
        out.append(
            f"| {name} | {row['server_cpu_ms']:.3f} | {row['client_cpu_ms']:.3f}"
            f" | {together:.3f} | {row['wall_ms']:.3f} |"
        )
    stream = floor.get("unary_stream")
    if stream is not None:
        together = stream["server_cpu_ms"] + stream["client_cpu_ms"]
        verdict = (
            "is below what this one streaming call costs in Python's gRPC"
            if together > 1.0
            else f"leaves {1.0 - together:.2f} ms beside this one call"
        )
        out += [
            "",
            f"The CPU target of 1 ms per request across all of Marie's processes {verdict}.",
        ]
    out.append("")
    return out


def write_report(results: dict[str, Any], plots: Path, target: Path) -> str:
    info = results["machine"]
    lines = [
        "# Benchmarks: Marie and LiteLLM proxy, side by side",
        "",
        "Generated by `make bench-compare` (bench/versus.py); do not edit by hand.",
        "Each gateway serves the same fake upstreams (tests/fakes: Ollama and OpenAI-compatible,",
        "in a process of their own) with the same request bodies. The gateways run pinned to",
        "core 0 (one at a time under load, alternating round by round); wrk, the upstreams and",
        "the driver run on core 1. Figures are medians over the rounds, with min-max in brackets.",
        "Marie is started as a person starts it: `taskset -c 0 marie up` from a plain shell",
        "environment (bench/common.py), with its defaults: key checks, limits counted by auth,",
        "metrics, usage recording, access log at info; memory enrichment is off for `/v1` calls",
        "(the default). LiteLLM runs with a master key, no database, no callbacks, retries off,",
        "one worker, logs at ERROR.",
        "",
        "CPU per request falls as load rises (at concurrency 1 every request wakes five",
        "processes alone; at 16 and more, wake-ups are shared), and every figure depends on the",
        "machine: the bare gRPC call below is the yardstick to compare runs by.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores; load average (1, 5, 15 min) before"
        " the run: "
        + ", ".join(f"{x:.2f}" for x in info["load_before"])
        + "; after: "
        + ", ".join(f"{x:.2f}" for x in info.get("load_after", ())),
        f"- Linux {info['kernel']}, Python {info['python']}, {info['wrk']}",
        f"- LiteLLM {info['litellm']} (bench/versus/requirements.txt), Marie at this commit",
        f"- Run on {info['date']}: `{info['command']}`",
        "",
    ]
    if "grpc_floor" in results:
        lines += floor_section(results["grpc_floor"])
    for name in ("ollama", "openai"):
        if name in results:
            lines += dialect_section(name, results[name])
    if "soak" in results:
        run = results.get("soak_run", {})
        lines += [
            "## Memory over a soak at a steady rate",
            "",
            f"Both gateways side by side, {run.get('rate', '?')} non-streaming requests/s each"
            f" for {run.get('minutes', '?')} minutes (Ollama dialect); RSS of every process of"
            " each gateway, sampled every 5 s, growth counted after the first minute"
            f" (run on {run.get('date', '?')}: `{run.get('command', '?')}`).",
            "",
            "| gateway | RSS after warm-up MB | RSS at end MB | growth MB | failed requests |",
            "|---|---|---|---|---|",
        ]
        for gateway, s in results["soak"].items():
            lines.append(
                f"| {gateway} | {s['rss_start_mb']:.1f} | {s['rss_end_mb']:.1f}"
                f" | {s['growth_mb']:+.1f} | {s['failures']} |"
            )
        lines.append("")
    if results.get("memory_search"):
        lines += [
            "## Memory search (Marie's SQLite store)",
            "",
            "```",
            results["memory_search"],
            "```",
            "",
        ]
    text = "\n".join(lines) + kept_sections(target)
    target.write_text(text)
    return text


def kept_sections(target: Path) -> str:
    """Sections other benchmarks keep in the same file between their markers
    (`<!-- name:begin -->` … `<!-- name:end -->`, e.g. bench/memory_quality.py's),
    carried over when this report rewrites it."""
    if not target.exists():
        return ""
    kept = re.findall(
        r"\n<!-- ([\w:.-]+):begin -->\n.*?\n<!-- \1:end -->\n", target.read_text(), re.S
    )
    text = target.read_text()
    blocks = []
    for name in kept:
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        blocks.append(begin + text.split(begin, 1)[1].split(end, 1)[0] + end)
    return "".join(f"\n{block}\n" for block in blocks)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(
        write_report(
            json.loads((out / "results.json").read_text()), out, out.parent / "benchmarks.md"
        )
    )
