"""The plots of docs/benchmarks.md, from results.json (run with a Python that has
matplotlib: the benchmark's own .venv-bench, not Marie's environment)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib  # type: ignore[import-not-found,unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
from matplotlib.ticker import (  # type: ignore[import-not-found,unused-ignore]
    NullFormatter,
    ScalarFormatter,
)

COLOURS = {"direct": "#7f7f7f", "marie": "#1f77b4", "litellm": "#d62728"}
LABELS = {"direct": "upstream, direct", "marie": "Marie", "litellm": "LiteLLM proxy"}


def latency_cdf(name: str, data: dict[str, Any], out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target, levels in data["wrk"].items():
        runs = levels["1"]
        points = sorted((p for p in runs[0]["latency_us"] if p != "max"), key=float)
        xs = [statistics.median(r["latency_us"][p] for r in runs) / 1000 for p in points]
        left.plot(xs, [float(p) for p in points], label=LABELS[target], color=COLOURS[target])
    left.set(title="Non-streaming latency, concurrency 1", xlabel="ms", ylabel="percentile")
    left.set_xscale("log")
    for target, samples in data["ttft_ms"].items():
        ordered = sorted(samples)
        ys = [100 * (i + 1) / len(ordered) for i in range(len(ordered))]
        right.plot(ordered, ys, label=LABELS[target], color=COLOURS[target])
    right.set(title="Time to first token, concurrency 1", xlabel="ms", ylabel="percentile")
    right.set_xscale("log")
    for axis in (left, right):
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out / f"latency-{name}.png", dpi=110)
    plt.close(fig)


def throughput(name: str, data: dict[str, Any], out: Path) -> None:
    fig, axis = plt.subplots(figsize=(6, 4))
    for target in ("marie", "litellm"):
        levels = sorted(data["wrk"][target], key=int)
        rps = [[r["rps"] for r in data["wrk"][target][c]] for c in levels]
        middle = [statistics.median(v) for v in rps]
        errors = [
            [m - min(v) for m, v in zip(middle, rps, strict=True)],
            [max(v) - m for m, v in zip(middle, rps, strict=True)],
        ]
        axis.errorbar(
            [int(c) for c in levels],
            middle,
            yerr=errors,
            marker="o",
            capsize=3,
            label=LABELS[target],
            color=COLOURS[target],
        )
    axis.set(
        title="Throughput on one core (non-streaming)",
        xlabel="concurrent connections",
        ylabel="requests/s",
    )
    axis.set_xscale("log", base=2)
    axis.grid(True, alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(out / f"throughput-{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    out = Path(sys.argv[1])
    results = json.loads((out / "results.json").read_text())
    for name in ("ollama", "openai"):
        if name in results:
            latency_cdf(name, results[name], out)
            throughput(name, results[name], out)


if __name__ == "__main__":
    main()
