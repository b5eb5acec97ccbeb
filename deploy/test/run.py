"""`make test-deploy`: docker-compose.yml run for real, scaled, and hurt.

1. A private Docker Engine and Compose (deploy/test/engine.py) and stand-ins
   for the third-party images (deploy/test/standins.py).
2. The project's docker-compose.yml, unchanged, plus
   deploy/test/compose.sandbox.yml (this machine's limits only): built,
   started, and checked through Envoy (REST, SSE, gRPC, memory, a turn).
3. Scaled (gateway 2, providers 3, memory 2, auth 2), then measured:
   spread of 3,000 requests per path over the replicas (from their
   /metrics), an rpm=50 key across both gateways and gRPC, replicas killed
   under 60 s of mixed load, a rolling restart of every service.
4. With --cluster, three OpenSearch nodes (docker-compose.opensearch-cluster.yml
   and, for this sandbox, deploy/test/compose.sandbox-cluster.yml), and the
   elected cluster manager killed under the same load after the replicas.
5. The `observability` profile (without Grafana): Prometheus's targets and
   rules, the dashboard's queries, a chat's trace through the collector.

Prints one line per figure and ends non-zero when a check fails. The stack
is left running (`--down` removes it) so that it can be looked at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import engine
import grpc
import httpx
import standins
import yaml
from engine import log
from marie.providers.v1 import provider_service_pb2 as providers_pb
from marie.providers.v1 import provider_service_pb2_grpc as providers_grpc

ROOT = Path(__file__).resolve().parents[2]

ENVOY = "http://127.0.0.1:8080"
ENVOY_GRPC = "127.0.0.1:8080"
MODEL = "ollama/llama3.2:latest"
SLOW_MODEL = "ollama/slow"
SCALE = {"gateway": 2, "providers": 3, "memory": 2, "auth": 2}
SPREAD_REQUESTS = 3000
SPREAD_TOLERANCE = 0.15
CONCURRENCY = 16
RPM = 50
FAULT_SECONDS = 60.0
STREAM_TIMEOUT_SECONDS = 60.0
USAGE_WAIT_SECONDS = 30.0
# What the spread counts, in each replica's /metrics.
CHATS = "/v1/chat/completions"
CREATE = "/marie.providers.v1.ProviderService/CreateChatCompletion"
LIST = "/marie.memory.v1.MemoryService/ListMemories"


class Failures:
    """Checks that failed; the run goes on and ends non-zero."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        log(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.items.append(what)


FAILURES = Failures()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


# --- compose -------------------------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    files: list[str]
    cluster: bool = False
    scale: dict[str, int] = field(default_factory=dict)

    def compose(self, *args: str, capture: bool = False) -> str:
        command = ["docker", "compose", "--progress", "quiet"]
        for file in self.files:
            command += ["-f", file]
        result = subprocess.run(
            [*command, *args],
            cwd=ROOT,
            env=self.env,
            check=True,
            text=True,
            stdout=subprocess.PIPE if capture else None,
        )
        return result.stdout or ""

    def docker(self, *args: str) -> str:
        return subprocess.run(
            ["docker", *args], env=self.env, check=True, text=True, capture_output=True
        ).stdout

    def up(self) -> None:
        scale = [f"--scale={name}={count}" for name, count in self.scale.items()]
        self.compose("up", "-d", "--wait", "--quiet-pull", *scale)

    def containers(self, service: str) -> list[str]:
        """The ids of the service's running containers."""
        return self.compose("ps", "-q", service, capture=True).split()

    def replicas(self, service: str) -> list[tuple[str, str]]:
        """(container name, address on the compose network) of each replica."""
        found = []
        for container in self.containers(service):
            name, address = self.docker(
                "inspect",
                "-f",
                "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ).split()
            found.append((name.lstrip("/"), address))
        return sorted(found)

    def create_key(self, name: str, *extra: str) -> str:
        out = self.compose(
            "run",
            "--rm",
            "--no-deps",
            "-T",
            "cli",
            "keys",
            "create",
            "--name",
            name,
            "--json",
            *extra,
            capture=True,
        )
        return str(json.loads(out)["key"])

    def wait_healthy(self, container: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.docker(
                "inspect",
                "-f",
                "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                container,
            ).split()
            if state[-1] == "healthy":
                return
            time.sleep(1)
        raise TimeoutError(f"{container} not healthy in {timeout:.0f} s")


ENVOY_ADMIN = "http://127.0.0.1:9901"


def wait_in_envoy(cluster: str, address: str, timeout: float = 60.0) -> None:
    """Until Envoy's own health check passes `address` again: a replica
    healthy for Docker may still be marked unhealthy in Envoy for one check
    interval (5 s), and restarting the next one meanwhile leaves Envoy none."""
    deadline = time.monotonic() + timeout
    healthy = f"{cluster}::{address}:"
    while time.monotonic() < deadline:
        for line in httpx.get(f"{ENVOY_ADMIN}/clusters", timeout=5).text.splitlines():
            if line.startswith(healthy) and line.endswith("::health_flags::healthy"):
                return
        time.sleep(0.5)
    raise TimeoutError(f"Envoy did not see {cluster} {address} healthy in {timeout:.0f} s")


SERVER_ERRORS = {"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}


def envoy_failures(stack: Stack, since: float) -> list[str]:
    """Envoy's access log lines since `since` (a Unix time) of calls it
    answered 5xx or that ended with a gRPC error: with the upstream host, the
    attempts made and the connection failure, what a failed request went through."""
    (envoy,) = stack.containers("envoy")
    logs = stack.docker("logs", "--since", f"{since:.0f}", envoy)  # the access log: stdout
    failed = []
    for line in logs.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or "status" not in entry:
            continue
        if str(entry["status"]).startswith("5") or entry.get("grpc_status") in SERVER_ERRORS:
            keep = ("time", "path", "status", "grpc_status", "flags", "duration_ms")
            more = ("upstream_host", "attempts", "upstream_failure")
            failed.append(" ".join(str(entry.get(name)) for name in (*keep, *more)))
    return failed


def report_failures(what: str, ledger: Ledger, stack: Stack, since: float) -> None:
    FAILURES.check(
        not ledger.failures,
        f"{what}: {len(ledger.failures)}" + "".join(f"\n      {f}" for f in ledger.failures[:12]),
    )
    if ledger.failures:
        lines = envoy_failures(stack, since)
        log(f"Envoy's log of failed calls ({len(lines)}):")
        for line in lines[:20]:
            log(f"  {line}")


# --- metrics ---------------------------------------------------------------------

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def metric_sum(text: str, name: str, **wanted: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if all(re.fullmatch(pattern, labels.get(key, "")) for key, pattern in wanted.items()):
            total += float(match["value"])
    return total


def scrape(address: str, port: int) -> str:
    return httpx.get(f"http://{address}:{port}/metrics", timeout=10).text


def replica_counts(
    stack: Stack, service: str, port: int, name: str, **labels: str
) -> dict[str, float]:
    return {
        replica: metric_sum(scrape(address, port), name, **labels)
        for replica, address in stack.replicas(service)
    }


def check_spread(what: str, before: dict[str, float], after: dict[str, float], total: int) -> None:
    counts = {replica: after.get(replica, 0.0) - before.get(replica, 0.0) for replica in after}
    even = total / len(counts)
    shares = ", ".join(
        f"{replica.split('-', 1)[1]} {count:.0f}" for replica, count in counts.items()
    )
    worst = max(abs(count - even) / even for count in counts.values())
    FAILURES.check(
        worst <= SPREAD_TOLERANCE and abs(sum(counts.values()) - total) <= total * 0.02,
        f"spread {what}: {shares} (of {sum(counts.values()):.0f}; "
        f"worst {worst:+.1%} from even; {load()})",
    )


# --- traffic ---------------------------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def write_headers(key: str, write_id: str) -> dict[str, str]:
    """A write's headers, with the Idempotency-Key a client sends so that
    the write may be retried (by Envoy, on another gateway) and is stored once."""
    return {**auth(key), "idempotency-key": write_id}


async def chat(client: httpx.AsyncClient, key: str, text: str) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": MODEL, "messages": [{"role": "user", "content": text}]},
    )


async def stream(client: httpx.AsyncClient, key: str) -> str:
    """How a stream of the slow model ended: "done", "error" (an error event
    or a cut connection) or "hung" (nothing for STREAM_TIMEOUT_SECONDS)."""
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_SECONDS):
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                headers=auth(key),
                json={
                    "model": SLOW_MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "go"}],
                },
            ) as reply:
                if reply.status_code != 200:
                    return f"status {reply.status_code}"
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        return "done"
                    if line.startswith("data: ") and '"error"' in line:
                        return "error"
                return "cut"
    except TimeoutError:
        return "hung"
    except httpx.HTTPError:
        return "cut"


async def drive(
    workers: int, seconds: float | None, count: int | None, task: Callable[[int], Awaitable[None]]
) -> None:
    """`task(i)` over `workers` concurrent workers, `count` times or for `seconds`."""
    deadline = time.monotonic() + seconds if seconds else None
    counter = iter(range(count if count is not None else 10**9))

    async def worker() -> None:
        for i in counter:
            if deadline and time.monotonic() > deadline:
                return
            await task(i)

    await asyncio.gather(*(worker() for _ in range(workers)))


# --- phases ----------------------------------------------------------------------


async def smoke(stack: Stack, key: str) -> None:
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        models = await client.get("/v1/models", headers=auth(key))
        FAILURES.check(
            models.status_code == 200 and MODEL.split("/", 1)[1] in models.text,
            f"GET /v1/models through Envoy: {models.status_code}",
        )
        reply = await chat(client, key, "hello")
        FAILURES.check(
            reply.status_code == 200 and "Hello" in reply.text,
            f"chat through Envoy: {reply.status_code}",
        )
        FAILURES.check(await stream(client, key) == "done", "stream through Envoy ends with [DONE]")
        added = await client.post(
            "/api/memories",
            headers=auth(key),
            json={"messages": [{"role": "user", "content": "I like tea"}], "infer": False},
        )
        FAILURES.check(
            added.status_code == 200, f"POST /api/memories: {added.status_code} {added.text[:200]}"
        )
        conversation = await client.post(
            "/api/conversations", headers=auth(key), json={"title": "smoke", "model": MODEL}
        )
        turn = await client.post(
            f"/api/conversations/{conversation.json()['id']}/messages",
            headers=auth(key),
            json={"content": "hi", "stream": False},
        )
        FAILURES.check(turn.status_code == 200, f"conversation turn: {turn.status_code}")
    async with grpc.aio.insecure_channel(ENVOY_GRPC) as channel:
        listed = await providers_grpc.ProviderServiceStub(channel).ListModels(
            providers_pb.ListModelsRequest(),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=10,
        )
        FAILURES.check(
            len(listed.models) > 0, f"gRPC ListModels through Envoy: {len(listed.models)} models"
        )


async def spread(stack: Stack, key: str) -> None:
    def gateways() -> dict[str, float]:
        return replica_counts(stack, "gateway", 8000, "marie_http_requests_total", route=CHATS)

    def providers() -> dict[str, float]:
        return replica_counts(stack, "providers", 9464, "marie_rpc_calls_total", method=CREATE)

    def memory() -> dict[str, float]:
        return replica_counts(stack, "memory", 9464, "marie_rpc_calls_total", method=LIST)

    before = {"gateway": gateways(), "providers": providers(), "memory": memory()}
    async with httpx.AsyncClient(
        base_url=ENVOY, timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)
    ) as client:
        statuses: Counter[int] = Counter()

        async def one_chat(i: int) -> None:
            statuses[(await chat(client, key, f"spread {i}")).status_code] += 1

        began = time.monotonic()
        await drive(CONCURRENCY, None, SPREAD_REQUESTS, one_chat)
        log(
            f"{SPREAD_REQUESTS} chats in {time.monotonic() - began:.1f} s: "
            f"{dict(statuses)} ({load()})"
        )
        check_spread(
            "of chats over gateways (HTTP through Envoy)",
            before["gateway"],
            gateways(),
            SPREAD_REQUESTS,
        )
        check_spread(
            "of the gateways' gRPC calls to providers",
            before["providers"],
            providers(),
            SPREAD_REQUESTS,
        )

        async def one_list(i: int) -> None:
            statuses[
                (
                    await client.get("/api/memories", headers=auth(key), params={"limit": 1})
                ).status_code
            ] += 1

        statuses.clear()
        await drive(CONCURRENCY, None, SPREAD_REQUESTS, one_list)
        log(f"{SPREAD_REQUESTS} memory lists: {dict(statuses)} ({load()})")
        check_spread(
            "of the gateways' gRPC calls to memory", before["memory"], memory(), SPREAD_REQUESTS
        )


async def limits(stack: Stack) -> None:
    key = stack.create_key("rpm50", "--rpm", str(RPM))
    metadata = [("authorization", f"Bearer {key}")]
    codes: Counter[str] = Counter()
    async with (
        httpx.AsyncClient(base_url=ENVOY, timeout=30) as client,
        grpc.aio.insecure_channel(ENVOY_GRPC) as channel,
    ):
        stub = providers_grpc.ProviderServiceStub(channel)

        async def one(i: int) -> None:
            if i % 2:
                codes[f"http {(await chat(client, key, f'limit {i}')).status_code}"] += 1
                return
            chat_request = providers_pb.StreamChatCompletionRequest(
                model=MODEL,
                messages=[
                    providers_pb.ChatMessage(role=providers_pb.ROLE_USER, content=f"limit {i}")
                ],
            )
            request = providers_pb.CreateChatCompletionRequest(chat=chat_request)
            try:
                await stub.CreateChatCompletion(request, metadata=metadata, timeout=30)
                codes["grpc OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[f"grpc {error.code().name}"] += 1

        began = time.monotonic()
        await drive(8, None, 200, one)
        elapsed = time.monotonic() - began
    admitted = codes["http 200"] + codes["grpc OK"]
    # The documented bound (docs/decisions.md, "Limits across gateway
    # replicas"): each holder (a gateway, or a providers replica for gRPC
    # through Envoy) may admit its lease of k = rpm/20 beyond the bucket,
    # and the bucket refills at rpm/60 a second while the requests run.
    holders = SCALE["gateway"] + SCALE["providers"]
    refill = math.ceil(RPM * elapsed / 60)
    bound = RPM + refill + holders * max(1, RPM // 20)
    FAILURES.check(
        RPM <= admitted <= bound,
        f"rpm={RPM} key, 200 requests in {elapsed:.1f} s over 2 gateways and gRPC: {admitted} "
        f"admitted (bound {bound}: {RPM} + {refill} refilled + {holders} holders' leases) "
        f"{dict(codes)} ({load()})",
    )


KINDS = ("chat", "stream", "turn", "memory")


@dataclass
class Ledger:
    """What the fault load sent and was told, to look for afterwards."""

    began: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    #: Each request: (seconds from `began` to its sending, kind, ok).
    sent: list[tuple[float, str, bool]] = field(default_factory=list)
    memories: list[str] = field(default_factory=list)
    turns: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, at: float, outcome: str, ok: bool, detail: str = "") -> None:
        """One request sent at `at` (monotonic) ended with `outcome`. A stream
        that did not end with [DONE] is not a failure here: the checks count
        its outcomes (error event, cut, hung) instead."""
        self.counts[f"{kind} {outcome}"] += 1
        self.sent.append((at - self.began, kind, ok))
        if not ok and kind != "stream":
            self.failures.append(f"+{at - self.began:.1f} s {kind} {outcome} {detail}")

    def failed_per_kind(self, since: float) -> str:
        """`kind failed/total` of the requests sent from `since` (seconds from `began`) on."""
        totals: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for at, kind, ok in self.sent:
            if at >= since:
                totals[kind] += 1
                failed[kind] += not ok
        return ", ".join(f"{kind} {failed[kind]}/{totals[kind]}" for kind in KINDS)


async def mixed_load(stack: Stack, key: str, seconds: float, ledger: Ledger) -> None:
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        batch = os.urandom(6).hex()  # this load's writes have keys of their own
        conversations = []
        for n in range(4):
            created = await client.post(
                "/api/conversations",
                headers=auth(key),
                json={"title": f"fault {n}", "model": MODEL},
            )
            conversations.append(created.json()["id"])
            ledger.turns[conversations[-1]] = 0

        async def send(kind: str, i: int, conversation: str) -> httpx.Response:
            if kind == "chat":
                return await chat(client, key, f"fault {i}")
            if kind == "turn":
                return await client.post(
                    f"/api/conversations/{conversation}/messages",
                    headers=write_headers(key, f"{batch}-{i}"),
                    json={"content": f"turn {i}", "stream": False},
                )
            return await client.post(
                "/api/memories",
                headers=write_headers(key, f"{batch}-{i}"),
                json={
                    "messages": [{"role": "user", "content": f"fact number {i}"}],
                    "infer": False,
                },
            )

        async def one(i: int) -> None:
            kind = KINDS[i % 4]
            conversation = conversations[(i // 4) % len(conversations)]
            at = time.monotonic()
            if kind == "stream":
                ended = await stream(client, key)
                ledger.record(kind, at, ended, ended == "done")
                return
            try:
                reply = await send(kind, i, conversation)
            except httpx.HTTPError as error:
                ledger.record(kind, at, type(error).__name__, False, repr(error))
                return
            ok = reply.status_code < 400
            ledger.record(kind, at, str(reply.status_code), ok, reply.text[:160])
            if ok and kind == "turn":
                ledger.turns[conversation] += 1
            elif ok and kind == "memory":
                ledger.memories.extend(item["id"] for item in reply.json()["data"])

        await drive(CONCURRENCY, seconds, None, one)


async def check_usage(client: httpx.AsyncClient, key: str, ledger: Ledger) -> None:
    """Every answered model call has its usage row (rows are queued by the
    gateway and written in the background: wait for them a little)."""
    answered = ledger.counts["chat 200"] + ledger.counts["stream done"] + ledger.counts["turn 200"]
    recorded = 0
    deadline = time.monotonic() + USAGE_WAIT_SECONDS
    while time.monotonic() < deadline:
        reply = await client.get("/api/usage", headers=auth(key))
        recorded = reply.json()["total"]["requests"] if reply.status_code == 200 else -1
        if recorded >= answered:
            break
        await asyncio.sleep(2)
    FAILURES.check(
        recorded >= answered,
        f"usage rows of the key: {recorded} for {answered} answered model calls",
    )


async def check_nothing_lost(key: str, ledger: Ledger) -> None:
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        await check_usage(client, key, ledger)
        models = await client.get("/v1/models", headers=auth(key))
        FAILURES.check(
            models.status_code == 200, f"the key still works afterwards: {models.status_code}"
        )
        missing = 0
        for memory in ledger.memories:
            if (await client.get(f"/api/memories/{memory}", headers=auth(key))).status_code != 200:
                missing += 1
        FAILURES.check(
            missing == 0,
            f"acknowledged memories found afterwards: "
            f"{len(ledger.memories) - missing} of {len(ledger.memories)}",
        )
        for conversation, turns in ledger.turns.items():
            stored = (
                await client.get(f"/api/conversations/{conversation}", headers=auth(key))
            ).json()
            # Each acknowledged turn stored two messages (question, answer);
            # a turn answered with an error may be stored too, never fewer.
            FAILURES.check(
                stored["message_count"] >= 2 * turns,
                f"conversation {conversation[:8]}: {stored['message_count']} messages "
                f"for {turns} acknowledged turns",
            )


# --- the OpenSearch cluster (--cluster) -------------------------------------------

# compose.sandbox-cluster.yml: the nodes share the namespace of
# `opensearch-net`, each on its own HTTP port.
OPENSEARCH_HOLDER = "opensearch-net"
OPENSEARCH_NODES = {"opensearch": 9200, "opensearch-2": 9201, "opensearch-3": 9202}
NODE_LOAD_SECONDS = 30.0  # of the fault load after an OpenSearch node's kill
REJOIN_TIMEOUT_SECONDS = 300.0


@dataclass
class ClusterWatch:
    """The OpenSearch cluster's health, asked of any node that answers."""

    address: str
    began: float = field(default_factory=time.monotonic)
    #: (seconds from `began`, state) at each change of state.
    timeline: list[tuple[float, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def get(self, client: httpx.AsyncClient, path: str) -> object:
        for port in OPENSEARCH_NODES.values():
            try:
                reply = await client.get(f"http://{self.address}:{port}{path}", timeout=2)
            except httpx.HTTPError:
                continue
            if reply.status_code == 200:
                return reply.json()
        return None

    async def state(self, client: httpx.AsyncClient) -> str:
        health = await self.get(client, "/_cluster/health")
        if not isinstance(health, dict):
            return "no answer"
        moving = [
            f"{health[name]} {name.split('_')[0]}"
            for name in ("unassigned_shards", "initializing_shards", "relocating_shards")
            if health[name]
        ]
        return ", ".join([f"{health['status']}, {health['number_of_nodes']} nodes", *moving])

    async def manager(self) -> str:
        """The name of the elected cluster manager."""
        async with httpx.AsyncClient() as client:
            answer = await self.get(client, "/_cat/cluster_manager?format=json")
        assert isinstance(answer, list) and answer, f"no cluster manager: {answer}"
        return str(answer[0]["node"])

    def start(self) -> None:
        """Records each change of state, asking once a second, until `stop`."""
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task

    async def _watch(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:  # the state once more after `stop`: the timeline ends with it
                state = await self.state(client)
                if not self.timeline or self.timeline[-1][1] != state:
                    self.timeline.append((time.monotonic() - self.began, state))
                if self._stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1)

    def since(self, moment: float) -> str:
        return "; ".join(
            f"{at - (moment - self.began):+.1f} s {state}" for at, state in self.timeline
        )

    async def wait_green(self, nodes: int, timeout: float) -> bool:
        """Until the cluster is green with `nodes` nodes (False: not in `timeout` s)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if (await self.state(client)) == f"green, {nodes} nodes":
                    return True
                await asyncio.sleep(1)
        return False


async def kill_opensearch_node(stack: Stack, cluster: ClusterWatch) -> tuple[str, float]:
    """Kills the elected cluster manager (the hardest node to lose: the others
    elect another) and says which it was and when."""
    node = await cluster.manager()
    (container,) = stack.containers(node)
    log(f"docker kill {container[:12]} (OpenSearch node {node}, the elected cluster manager)")
    killed_at = time.monotonic()
    await asyncio.to_thread(stack.docker, "kill", container)
    return node, killed_at


async def check_node_loss(
    stack: Stack, cluster: ClusterWatch, ledger: Ledger, node: str, killed_at: float
) -> None:
    """After an OpenSearch node's kill: what failed, how the cluster's
    health went, that it stayed writable; then the node back, and green."""
    since = killed_at - ledger.began
    late = [at for at, _, ok in ledger.sent if at >= since and not ok]
    log(
        f"requests sent after the kill of {node} (failed/total): "
        f"{ledger.failed_per_kind(since)}; last failure "
        + (f"{max(late) - since:+.1f} s after the kill" if late else "none")
    )
    writes = [ok for at, kind, ok in ledger.sent if at >= since and kind in ("turn", "memory")]
    FAILURES.check(
        bool(writes) and all(writes[-10:]),
        f"writes acknowledged after the kill: {sum(writes)} of {len(writes)}, "
        f"the last {len(writes[-10:])} all",
    )
    key = stack.create_key("after-node-kill")
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        models = await client.get("/v1/models", headers=auth(key))
    FAILURES.check(
        models.status_code == 200,
        f"a key created with {node} down works: {models.status_code}",
    )
    began = time.monotonic()
    await asyncio.to_thread(stack.up)  # the node back (and the killed replicas)
    healthy = time.monotonic() - began
    green = await cluster.wait_green(len(OPENSEARCH_NODES), REJOIN_TIMEOUT_SECONDS)
    FAILURES.check(
        green,
        f"{node} started again: healthy in {healthy:.0f} s, cluster green with "
        f"{len(OPENSEARCH_NODES)} nodes {time.monotonic() - began:.0f} s after its start "
        f"({load()})",
    )
    await cluster.stop()
    log(f"cluster health, from the kill: {cluster.since(killed_at)}")
    FAILURES.check(
        all("red" not in state for _, state in cluster.timeline),
        "the cluster never went red while a node was down",
    )


async def faults(stack: Stack) -> None:
    key = stack.create_key("faults")  # a key of its own: its usage is this phase's
    ledger = Ledger()
    victims = ["providers", "gateway", "memory", "auth"]
    interval = FAULT_SECONDS / (len(victims) + 1)
    seconds = FAULT_SECONDS + (NODE_LOAD_SECONDS if stack.cluster else 0)
    cluster = ClusterWatch(stack.replicas(OPENSEARCH_HOLDER)[0][1]) if stack.cluster else None
    node_killed: list[tuple[str, float]] = []

    async def killer() -> None:
        for service in victims:
            await asyncio.sleep(interval)
            name = stack.replicas(service)[0][0]
            log(f"docker kill {name}")
            await asyncio.to_thread(stack.docker, "kill", name)
        if cluster:
            await asyncio.sleep(interval)
            node_killed.append(await kill_opensearch_node(stack, cluster))

    if cluster:
        cluster.start()
    began, wall = time.monotonic(), time.time()
    await asyncio.gather(mixed_load(stack, key, seconds, ledger), killer())
    log(
        f"fault load for {time.monotonic() - began:.0f} s: "
        f"{dict(sorted(ledger.counts.items()))} ({load()})"
    )
    report_failures("non-streaming requests failed while replicas were killed", ledger, stack, wall)
    FAILURES.check(
        ledger.counts["stream hung"] == 0, f"streams hung: {ledger.counts['stream hung']}"
    )
    if cluster:
        await check_node_loss(stack, cluster, ledger, *node_killed[0])
    else:
        stack.up()  # the killed replicas back
    await check_nothing_lost(key, ledger)


async def rolling_restart(stack: Stack) -> None:
    key = stack.create_key("rolling")
    ledger = Ledger()
    stop = asyncio.Event()

    async def restarter() -> None:
        for service in SCALE:
            for name, address in stack.replicas(service):
                log(f"docker restart {name}")
                await asyncio.to_thread(stack.docker, "restart", "-t", "35", name)
                await asyncio.to_thread(stack.wait_healthy, name)
                await asyncio.to_thread(wait_in_envoy, service, address)
        stop.set()

    async def load_until_done() -> None:
        while not stop.is_set():
            await mixed_load(stack, key, 10, ledger)

    began, wall = time.monotonic(), time.time()
    await asyncio.gather(load_until_done(), restarter())
    log(
        f"rolling restart in {time.monotonic() - began:.0f} s: "
        f"{dict(sorted(ledger.counts.items()))} ({load()})"
    )
    report_failures("requests failed during the rolling restart", ledger, stack, wall)
    FAILURES.check(
        ledger.counts["stream hung"] == 0 and ledger.counts["stream cut"] == 0,
        "streams during the rolling restart all ended with [DONE]",
    )
    await check_nothing_lost(key, ledger)


# --- the observability profile ------------------------------------------------------

OBSERVABILITY = ROOT / "deploy" / "observability"
#: The profile's services that run here: Grafana has no stand-in (standins.py).
OBSERVED = ("otel-collector", "jaeger", "prometheus")
PROMETHEUS = "http://127.0.0.1:9090"
SCRAPED = {"gateway": SCALE["gateway"], "providers": SCALE["providers"], "memory": SCALE["memory"],
           "auth": SCALE["auth"], "envoy": 1}  # fmt: skip
SCRAPE_WAIT_SECONDS = 90.0
EXERCISE_SECONDS = 20.0
#: The services (their OpenTelemetry service.name) a chat's trace crosses.
TRACED = {"envoy", "marie-gateway", "marie-auth", "marie-providers"}
TRACE_WAIT_SECONDS = 60.0


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the provisioned Grafana dashboard."""
    dashboard = json.loads((OBSERVABILITY / "grafana" / "dashboards" / "marie.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


async def wait_for_targets(client: httpx.AsyncClient) -> dict[str, list[str]]:
    """Each scrape job's targets' health, once every expected target is up
    (or SCRAPE_WAIT_SECONDS have passed)."""
    deadline = time.monotonic() + SCRAPE_WAIT_SECONDS
    while True:
        active = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
        health: dict[str, list[str]] = {job: [] for job in SCRAPED}
        for target in active:
            health.setdefault(target["labels"]["job"], []).append(target["health"])
        if time.monotonic() > deadline or all(
            health[job].count("up") == count for job, count in SCRAPED.items()
        ):
            return health
        await asyncio.sleep(2)


async def follow_trace(stack: Stack, key: str) -> set[str]:
    """The services whose spans of one chat's trace reached the jaeger
    stand-in through the collector."""
    trace_id = os.urandom(16).hex()
    headers = {**auth(key), "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        reply = await client.post(
            "/v1/chat/completions",
            headers=headers,
            json={"model": MODEL, "messages": [{"role": "user", "content": "traced"}]},
        )
    FAILURES.check(reply.status_code == 200, f"the traced chat: {reply.status_code}")
    (jaeger,) = stack.containers("jaeger")
    wanted = TRACED
    deadline = time.monotonic() + TRACE_WAIT_SECONDS
    services: set[str] = set()
    while time.monotonic() < deadline and not wanted <= services:
        await asyncio.sleep(2)
        logs = await asyncio.to_thread(stack.docker, "logs", jaeger)
        services = {json.loads(line)["service"] for line in logs.splitlines() if trace_id in line}
    return services


async def exercise(stack: Stack, key: str) -> None:
    """Traffic for every panel of the dashboard: the mixed load (chats,
    streams, turns, memories), memory searches, chats of a model that does
    not exist (upstream errors, non-OK calls), of a model that fails its
    answers (server errors) and of a key over its limit."""
    await mixed_load(stack, key, EXERCISE_SECONDS, Ledger())
    limited = stack.create_key("rpm1", "--rpm", "1")
    async with httpx.AsyncClient(base_url=ENVOY, timeout=30) as client:
        for i in range(3):
            await chat(client, limited, f"over the limit {i}")
            await client.get("/api/memories/search", headers=auth(key), params={"q": "fact"})
            for model in ("ollama/nope", "ollama/broken"):
                await client.post(
                    "/v1/chat/completions",
                    headers=auth(key),
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                )


async def queries_without_series(client: httpx.AsyncClient) -> list[str]:
    """The dashboard's queries that Prometheus answers with no series (or an
    error), once none does or SCRAPE_WAIT_SECONDS have passed: a rate needs
    two scrapes (15 s apart) of the traffic."""
    deadline = time.monotonic() + SCRAPE_WAIT_SECONDS
    while True:
        empty = []
        for query in dashboard_queries():
            answer = (await client.get("/api/v1/query", params={"query": query})).json()
            if answer.get("status") != "success" or not answer["data"]["result"]:
                empty.append(f"{query} -> {answer.get('error') or 'no series'}")
        if not empty or time.monotonic() > deadline:
            return empty
        await asyncio.sleep(5)


async def observability(stack: Stack, key: str) -> None:
    async with httpx.AsyncClient(base_url=PROMETHEUS, timeout=10) as client:
        health = await wait_for_targets(client)
        for job, count in SCRAPED.items():
            FAILURES.check(
                health[job].count("up") == count and len(health[job]) == count,
                f"Prometheus scrapes {job}: {health[job].count('up')} of {count} targets up "
                f"({health[job]})",
            )
        rules = (await client.get("/api/v1/rules")).json()["data"]["groups"]
        loaded = {rule["name"]: rule.get("health") for group in rules for rule in group["rules"]}
        alerts = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
        named = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
        FAILURES.check(
            named <= set(loaded) and "err" not in loaded.values(),
            f"alert rules loaded: {len(named & set(loaded))} of {len(named)} ({loaded})",
        )
        await exercise(stack, key)
        empty = await queries_without_series(client)
        total = len(dashboard_queries())
        FAILURES.check(
            not empty,
            f"dashboard queries with series: {total - len(empty)} of {total} ({load()})"
            + "".join(f"\n      {line}" for line in empty),
        )
    services = await follow_trace(stack, key)
    FAILURES.check(
        services >= TRACED,
        f"a chat's trace through the collector has spans of: {sorted(services)}",
    )


PHASES = ["smoke", "spread", "limits", "faults", "rolling", "observability"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the stand-in images")
    parser.add_argument(
        "--cluster", action="store_true", help="with docker-compose.opensearch-cluster.yml"
    )
    parser.add_argument(
        "--down", action="store_true", help="remove the stack (and its volumes) at the end"
    )
    parser.add_argument("--only", choices=PHASES, action="append")
    args = parser.parse_args()

    phases = args.only or PHASES
    env = engine.ensure()
    standins.ensure(env, rebuild=args.rebuild, observability="observability" in phases)
    files = ["docker-compose.yml", "deploy/test/compose.sandbox.yml"]
    if args.cluster:
        files.insert(1, "docker-compose.opensearch-cluster.yml")
        files.append("deploy/test/compose.sandbox-cluster.yml")
    stack = Stack(env, files, cluster=args.cluster)
    began = time.monotonic()
    stack.compose("--profile", "tools", "build", "--quiet")
    log(f"images built in {time.monotonic() - began:.0f} s ({load()})")
    if "smoke" not in phases:
        stack.scale = SCALE
    began = time.monotonic()
    stack.up()
    log(f"stack healthy in {time.monotonic() - began:.0f} s ({load()})")
    key = stack.create_key("deploy-test")
    if "smoke" in phases:
        asyncio.run(smoke(stack, key))
        stack.scale = SCALE
        began = time.monotonic()
        stack.up()
        log(f"scaled {SCALE} and healthy in {time.monotonic() - began:.0f} s ({load()})")
    # Spread last: right after a scale-out the gateways' channels to auth and
    # memory know only the replicas that existed when they connected, until a
    # connection ends (a replica's loss, a restart, or the servers' max
    # connection age); the rolling restart ends them all.
    if "limits" in phases:
        asyncio.run(limits(stack))
    if "faults" in phases:
        asyncio.run(faults(stack))
    if "rolling" in phases:
        asyncio.run(rolling_restart(stack))
    if "spread" in phases:
        asyncio.run(spread(stack, key))
    if "observability" in phases:
        began = time.monotonic()
        stack.compose("--profile", "observability", "up", "-d", "--wait", *OBSERVED)
        # Marie's services again, now sending their spans to the collector.
        stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel-collector:4318"
        stack.up()
        log(f"observability profile (without Grafana) up in {time.monotonic() - began:.0f} s")
        asyncio.run(observability(stack, key))
    if args.down:  # the observability profile's services too
        stack.compose("--profile", "observability", "down", "-v")
    if FAILURES.items:
        log(f"{len(FAILURES.items)} check(s) failed:")
        for item in FAILURES.items:
            log(f"  {item.splitlines()[0]}")
        return 1
    log("every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
