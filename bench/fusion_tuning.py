"""Choose hybrid search's fusion constants offline, on LOCOMO's tuning half.

Input: the candidates `bench/memory_quality.py --dump FILE` saved (each
question's keyword and vector top 100, with the scores the memory service
gives: BM25 as a ratio to the best hit, cosine for vectors). Each fusion is
re-run on the first `--candidates` of each list (the service fetches 50 for
a top 10) and scored by recall@5/10 and per-category recall@10 on the tuning
half; the held-out half is printed for the chosen constants only, to check.

Usage: .venv/bin/python bench/fusion_tuning.py /tmp/candidates.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services" / "memory" / "src"))

from marie_memory.fusion import min_max_fusion  # noqa: E402

Hits = list[tuple[str, float]]
#: What the service runs (MARIE_MEMORY_VECTOR_WEIGHT / _KEYWORD_WEIGHT defaults).
SERVICE = "min-max vw=0.35"
Fusion = Callable[[Hits, Hits], dict[str, float]]


def weighted_sum(vw: float) -> Fusion:
    """The fusion before issue 25: vw x cosine + (1 - vw) x BM25 ratio."""

    def fuse(vector: Hits, keyword: Hits) -> dict[str, float]:
        scores = {m: vw * s for m, s in vector}
        for m, s in keyword:
            scores[m] = scores.get(m, 0.0) + (1 - vw) * s
        return scores

    return fuse


def min_max(vw: float) -> Fusion:
    """The service's fusion (marie_memory.fusion): each side min-max scaled, weighted."""

    def fuse(vector: Hits, keyword: Hits) -> dict[str, float]:
        return min_max_fusion(vector, keyword, vector_weight=vw, keyword_weight=1 - vw)

    return fuse


def rrf(k: float, vw: float) -> Fusion:
    """Weighted reciprocal-rank fusion: vw / (k + vector rank) + (1 - vw) / (k + keyword rank)."""

    def fuse(vector: Hits, keyword: Hits) -> dict[str, float]:
        scores: dict[str, float] = defaultdict(float)
        for weight, hits in ((vw, vector), (1 - vw, keyword)):
            for rank, (m, _) in enumerate(hits, start=1):
                scores[m] += weight / (k + rank)
        return scores

    return fuse


def evaluate(
    questions: list[dict[str, Any]], owners: dict[str, dict[str, list[str]]], fuse: Fusion, n: int
) -> dict[str, float]:
    hits = {1: 0, 5: 0, 10: 0}
    cats: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for q in questions:
        own = owners[q["conversation"]]
        scores = fuse(
            [tuple(h) for h in q["vector"][:n]],
            [tuple(h) for h in q["keyword"][:n]],
        )
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:10]
        evidence = set(q["evidence"])
        found = [bool(set(own[m]) & evidence) for m, _ in ranked]
        for k in hits:
            hits[k] += any(found[:k])
        cats[q["category"]][0] += any(found)
        cats[q["category"]][1] += 1
    total = max(1, len(questions))
    out = {f"R@{k}": v / total for k, v in hits.items()}
    out |= {f"c{c}": h / t for c, (h, t) in sorted(cats.items())}
    return out


def single(questions: list[dict[str, Any]], owners: dict[str, Any], side: str) -> dict[str, float]:
    def fuse(vector: Hits, keyword: Hits) -> dict[str, float]:
        hits = vector if side == "vector" else keyword
        return {m: 1.0 - i / 1000 for i, (m, _) in enumerate(hits)}

    return evaluate(questions, owners, fuse, 10)


def worst_category_gap(result: dict[str, float], best_single: dict[str, float]) -> float:
    return min(result[c] - best_single[c] for c in best_single if c.startswith("c"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path)
    parser.add_argument("--candidates", type=int, default=50)
    args = parser.parse_args()
    data = json.loads(args.dump.read_text())
    owners = data["owners"]
    halves = {h: [q for q in data["questions"] if q["half"] == h] for h in ("tuning", "held-out")}
    tuning = halves["tuning"]
    print(f"tuning half: {len(tuning)} questions; held-out: {len(halves['held-out'])}")
    singles = {side: single(tuning, owners, side) for side in ("keyword", "vector")}
    best_single = {c: max(singles["keyword"][c], singles["vector"][c]) for c in singles["keyword"]}
    fmt = "  ".join
    for side, result in singles.items():
        print(f"{side:<24} " + fmt(f"{key} {value:.3f}" for key, value in result.items()))
    candidates: dict[str, Fusion] = {}
    for vw in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7):
        candidates[f"weighted sum vw={vw}"] = weighted_sum(vw)
        candidates[f"min-max vw={vw}"] = min_max(vw)
        for k in (2, 5, 10, 20, 40, 60):
            candidates[f"rrf k={k} vw={vw}"] = rrf(k, vw)
    results = {
        name: evaluate(tuning, owners, fuse, args.candidates) for name, fuse in candidates.items()
    }
    ranked = sorted(results.items(), key=lambda item: -(item[1]["R@10"] + item[1]["R@5"]))
    print("\nby R@5 + R@10 on the tuning half (gap: worst category vs the better single mode)")
    for name, result in ranked:
        gap = worst_category_gap(result, best_single)
        print(
            f"{name:<24} "
            + fmt(f"{key} {value:.3f}" for key, value in result.items())
            + f"  gap {gap:+.3f}"
        )
    eligible = [(n, r) for n, r in ranked if worst_category_gap(r, best_single) >= -0.02]
    chosen = (eligible or ranked)[0][0]
    print(f"\nbest on the tuning half: {chosen}; the service runs: {SERVICE}")
    held = halves["held-out"]
    if held:
        for side in ("keyword", "vector"):
            result = single(held, owners, side)
            print(f"held-out {side:<15} " + fmt(f"{k} {v:.3f}" for k, v in result.items()))
        for name in dict.fromkeys([chosen, SERVICE, "weighted sum vw=0.7"]):
            result = evaluate(held, owners, candidates[name], args.candidates)
            print(f"held-out {name:<15} " + fmt(f"{k} {v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
