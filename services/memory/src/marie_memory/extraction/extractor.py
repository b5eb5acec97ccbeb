"""LLM fact extraction, as mem0 does it, through providers' StreamChatCompletion.

Two calls, each constrained by a JSON schema (response_format JSON_SCHEMA, so
any provider with structured output works):

1. facts: short self-contained facts about the user, from the user and
   assistant messages (system messages are never shown to the model);
2. decisions: the facts next to the user's most similar stored memories
   (ids replaced by small integers so the model cannot invent real ids), and
   per fact ADD / UPDATE / DELETE / NONE.

An answer that is not valid JSON or does not follow the schema is asked for
once more; a second bad answer is EXTRACTION_FAILED. Every change is applied
in one store transaction after both steps succeed, with its history entry,
so a failure at any point changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
from marie.auth.v1 import auth_service_pb2 as auth_pb
from marie.providers.v1 import provider_service_pb2 as ppb
from marie_kit.context import outgoing_metadata
from marie_kit.errors import ServiceError
from marie_kit.identity import ALLOWED_MODELS_HEADER
from marie_kit.usage import new_record_id, timestamp

from marie_memory import limits
from marie_memory.core import MemoryCore, text_hash
from marie_memory.errors import (
    extraction_failed,
    model_not_allowed,
    model_not_found,
    provider_unavailable,
)
from marie_memory.extraction.prompts import (
    DECISIONS_PROMPT,
    DECISIONS_SCHEMA,
    FACTS_PROMPT,
    FACTS_SCHEMA,
    BadOutput,
    Decision,
    Fact,
    parse_decisions,
    parse_facts,
)
from marie_memory.records import (
    EVENT_ADD,
    EVENT_DELETE,
    EVENT_NONE,
    EVENT_UPDATE,
    ROLE_ASSISTANT,
    ROLE_USER,
    AddRequest,
    AddResult,
    Memory,
    MemoryChange,
    MemoryFilter,
)
from marie_memory.stores.contract import DuplicateMemory

if TYPE_CHECKING:
    from marie.providers.v1.provider_service_pb2_grpc import (
        ProviderServiceAsyncStub as ProvidersStub,
    )
else:
    ProvidersStub = Any

log = logging.getLogger("marie.memory.extraction")

#: What an extraction's model calls are recorded under in the usage ledger.
USAGE_OPERATION = "memory_extraction"
#: Where ledger records go (the kit's UsageRecorder.submit); never blocks.
UsageSink = Callable[[list[auth_pb.UsageRecord]], None]
# (key id, owner, allowed models) of the extraction running in this task.
_ACCOUNT: ContextVar[tuple[str, str, str]] = ContextVar(
    "marie_memory_account", default=("", "", "")
)
# An extraction call's HTTP-like status for the ledger, by gRPC code.
_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata of a model call: the request id and the key's allowed models."""
    allowed = _ACCOUNT.get()[2]
    return outgoing_metadata() + (((ALLOWED_MODELS_HEADER, allowed),) if allowed else ())


def tenant_of(user_id: str) -> str:
    """The tenant of a gateway-encoded user id (`<len>:<tenant>/<user>`); "" otherwise."""
    size, colon, rest = user_id.partition(":")
    if colon and size.isdigit() and len(rest) > int(size) and rest[int(size)] == "/":
        return rest[: int(size)]
    return ""


ROLE_NAMES = {ROLE_USER: "user", ROLE_ASSISTANT: "assistant"}


class LlmExtractor:
    """The `Extractor` of the core: two schema-constrained calls through providers."""

    def __init__(
        self, providers: ProvidersStub, timeout: float, *, usage: UsageSink | None = None
    ) -> None:
        self._providers = providers
        self._timeout = timeout
        self._usage = usage

    def _record(
        self,
        model: str,
        chunk: ppb.StreamChatCompletionResponse | None,
        started: float,
        status: int,
    ) -> None:
        """One ledger record for one model call, under the extraction's key."""
        key_id, owner, _ = _ACCOUNT.get()
        if self._usage is None or not key_id:
            return
        usage = chunk.usage if chunk is not None else ppb.Usage()
        self._usage(
            [
                auth_pb.UsageRecord(
                    id=new_record_id(),
                    key_id=key_id,
                    owner=owner,
                    provider=chunk.provider if chunk is not None else model.partition("/")[0],
                    model=(chunk.model if chunk is not None and chunk.model else model)[:256],
                    operation=USAGE_OPERATION,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    status=status,
                    time=timestamp(time.time() - (time.perf_counter() - started)),
                )
            ]
        )

    async def _complete(
        self, model: str, system: str, user: str, schema: dict[str, Any], name: str
    ) -> str:
        request = ppb.StreamChatCompletionRequest(
            model=model,
            messages=[
                ppb.ChatMessage(role=ppb.ROLE_SYSTEM, content=system),
                ppb.ChatMessage(role=ppb.ROLE_USER, content=user),
            ],
            sampling=ppb.SamplingParameters(temperature=0.0),
            response_format=ppb.ResponseFormat(
                type=ppb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                name=name,
                json_schema_json=json.dumps(schema),
                strict=True,
            ),
            aggregate=True,
        )
        parts: list[str] = []
        last: ppb.StreamChatCompletionResponse | None = None
        started = time.perf_counter()
        try:
            async for chunk in self._providers.StreamChatCompletion(
                request,
                timeout=self._timeout,
                metadata=_call_metadata(),
            ):
                parts.append(chunk.content)
                last = chunk
        except grpc.aio.AioRpcError as exc:
            self._record(model, last, started, _STATUS.get(exc.code(), 502))
            error = ServiceError.from_rpc_error(exc)
            if error.reason in ("MODEL_NOT_FOUND", "PROVIDER_NOT_FOUND"):
                raise model_not_found(model) from exc
            if error.reason == "MODEL_NOT_ALLOWED":
                # The key's own restriction: no retry will change it.
                raise model_not_allowed(model) from exc
            log.warning(
                "extraction call failed",
                extra={"model": model, "code": exc.code().name, "reason": error.reason},
            )
            raise provider_unavailable("extracting") from exc
        self._record(model, last, started, 200)
        return "".join(parts)

    async def _twice(
        self,
        model: str,
        system: str,
        user: str,
        *,
        schema: dict[str, Any],
        name: str,
        parse: Any,
    ) -> Any:
        why = ""
        for _ in range(2):
            content = await self._complete(model, system, user, schema, name)
            try:
                return parse(content)
            except BadOutput as exc:
                why = str(exc)
                log.info("extraction output refused", extra={"model": model, "why": why})
        raise extraction_failed(why)

    async def facts(self, model: str, request: AddRequest) -> list[Fact]:
        lines = [
            f"{ROLE_NAMES[m.role]}: {m.content}"
            for m in request.messages
            if m.role in ROLE_NAMES  # never system prompts (nor tool output)
        ]
        if not lines:
            return []
        conversation = "Conversation:\n" + "\n".join(lines)
        result: list[Fact] = await self._twice(
            model,
            FACTS_PROMPT,
            conversation,
            schema=FACTS_SCHEMA,
            name="memory_facts",
            parse=parse_facts,
        )
        return result

    async def decisions(
        self, model: str, existing: Sequence[Memory], facts: Sequence[Fact]
    ) -> list[Decision]:
        payload = json.dumps(
            {
                "existing_memories": [
                    {"id": str(i), "text": m.text} for i, m in enumerate(existing)
                ],
                "new_facts": [f.text for f in facts],
            },
            ensure_ascii=False,
        )
        result: list[Decision] = await self._twice(
            model,
            DECISIONS_PROMPT,
            payload,
            schema=DECISIONS_SCHEMA,
            name="memory_decisions",
            parse=lambda content: parse_decisions(content, len(existing)),
        )
        return result

    async def run(self, core: MemoryCore, request: AddRequest, model: str) -> list[AddResult]:
        account = _ACCOUNT.set(
            (
                request.key_id,
                request.key_owner or tenant_of(request.user_id),
                request.allowed_models,
            )
        )
        try:
            return await self._run(core, request, model)
        finally:
            _ACCOUNT.reset(account)

    async def _run(self, core: MemoryCore, request: AddRequest, model: str) -> list[AddResult]:

        facts = await self.facts(model, request)
        if not facts:
            return []
        # The user's most similar memories, for every fact, without duplicates.
        existing: dict[str, Memory] = {}
        for fact in facts:
            ranked = await core.search_memories(
                request.user_id,
                fact.text,
                top_k=core.similar_count,
                threshold=0.0,
                memory_filter=MemoryFilter(),
                mode=0,
            )
            for scored in ranked.memories:
                existing.setdefault(scored.memory.id, scored.memory)
        shown = list(existing.values())
        decisions = await self.decisions(model, shown, facts)
        return await self._apply(core, request, facts, shown, decisions)

    async def _apply(
        self,
        core: MemoryCore,
        request: AddRequest,
        facts: Sequence[Fact],
        shown: Sequence[Memory],
        decisions: Sequence[Decision],
    ) -> list[AddResult]:
        categories = {f.text: f.categories for f in facts}
        results: list[AddResult] = []
        changes: list[MemoryChange] = []
        texts: list[str] = []  # texts needing a vector, by change index
        touched: set[int] = set()
        now_memories = {m.hash for m in shown}
        for decision in decisions:
            if decision.event == EVENT_ADD:
                digest = text_hash(decision.text)
                duplicate = await core.store.find_memory_by_hash(request.user_id, digest)
                if duplicate is not None or digest in now_memories:
                    if duplicate is not None:
                        results.append(AddResult(EVENT_NONE, duplicate))
                    continue
                now_memories.add(digest)
                memory = core.new_memory(request, decision.text, categories.get(decision.text, ()))
                entry = core.history_entry(
                    request, memory.id, EVENT_ADD, old="", new=memory.text, inferred=True
                )
                changes.append(MemoryChange(EVENT_ADD, memory, entry))
                texts.append(memory.text)
                results.append(AddResult(EVENT_ADD, memory))
                continue
            target = shown[decision.target]
            if decision.target in touched:
                continue  # one change per memory and call
            if decision.event == EVENT_NONE:
                results.append(AddResult(EVENT_NONE, target))
                continue
            touched.add(decision.target)
            if decision.event == EVENT_DELETE:
                entry = core.history_entry(
                    request, target.id, EVENT_DELETE, old=target.text, new="", inferred=True
                )
                changes.append(MemoryChange(EVENT_DELETE, target, entry))
                results.append(AddResult(EVENT_DELETE, target))
                continue
            if decision.text == target.text:
                results.append(AddResult(EVENT_NONE, target))
                continue
            merged = list(dict.fromkeys([*target.categories, *request.categories]))
            updated = replace(
                target,
                text=decision.text,
                hash=text_hash(decision.text),
                categories=tuple(merged[: limits.MAX_CATEGORIES]),
                metadata={**target.metadata, **request.metadata},
                update_time=core.now(),
            )
            entry = core.history_entry(
                request, target.id, EVENT_UPDATE, old=target.text, new=updated.text, inferred=True
            )
            changes.append(MemoryChange(EVENT_UPDATE, updated, entry))
            texts.append(updated.text)
            results.append(AddResult(EVENT_UPDATE, updated, previous_text=target.text))
        # Vectors for every new text, then one transaction for everything.
        vectors = iter(await core.vectors_for(texts))
        final = [
            replace(change, vector=next(vectors)) if change.event != EVENT_DELETE else change
            for change in changes
        ]
        return await _write(core, request.user_id, final, results)


async def _write(
    core: MemoryCore, user_id: str, changes: list[MemoryChange], results: list[AddResult]
) -> list[AddResult]:
    """Writes the changes in one transaction; the results as they stand."""
    while changes:
        try:
            await core.store.apply_memory_changes(user_id, changes)
            break
        except DuplicateMemory as taken:
            # Another replica stored one of these texts just now: that one
            # stands (NONE), the rest is written.
            held = taken.memory
            changes = [
                c for c in changes if not (c.event == EVENT_ADD and c.memory.hash == held.hash)
            ]
            results = [
                AddResult(EVENT_NONE, held)
                if r.event == EVENT_ADD and r.memory.hash == held.hash
                else r
                for r in results
            ]
    return results
