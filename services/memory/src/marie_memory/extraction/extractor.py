"""LLM fact extraction, after mem0, through providers' StreamChatCompletion.

At most two calls, each constrained by a bounded JSON schema
(response_format JSON_SCHEMA: grammar-enforced on llama.cpp, OpenAI's
structured output, Ollama's `format`), with `max_tokens` room for no more
than the schema allows:

1. facts: short self-contained facts about the user, from the user's
   messages (the assistant's, system and tool messages are never shown to
   the model);
2. decisions, only for the facts that have a close stored memory (sharing a
   keyword, or a vector similarity of MARIE_MEMORY_CLOSE_MEMORY_SIMILARITY or
   more): those facts next to those memories (ids replaced by small integers
   so the model cannot invent real ids), and per fact ADD / UPDATE / DELETE /
   NONE. Facts with no close memory are added without asking (and a fact
   whose exact text is stored is not added again), so a user's new facts
   cost one model call, not two as in mem0.

An answer that is not JSON following the schema, or is cut off at
`max_tokens` (a small model looping), or does not end within the deadline
once it has begun, is asked for once more, stricter (fewer items, shorter
texts, fewer tokens, a shorter conversation); a second bad answer is
EXTRACTION_FAILED. The changes are planned (with their vectors) before
anything is written, then applied in one store transaction with their
history entries, so a failure at any point changes nothing, and a plan whose
write failed can be applied later without asking the model again.
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
from marie_kit.errors import ServiceError
from marie_kit.identity import ALLOWED_MODELS_HEADER
from marie_kit.usage import new_record_id, timestamp

from marie_memory import lane, limits
from marie_memory.core import MemoryCore, text_hash
from marie_memory.errors import (
    extraction_failed,
    model_not_allowed,
    model_not_found,
    provider_unavailable,
)
from marie_memory.extraction.prompts import (
    DECISIONS_PROMPT,
    FACTS_PROMPT,
    FIRST,
    STRICT,
    BadOutput,
    Bounds,
    Decision,
    Fact,
    decisions_schema,
    facts_schema,
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
    ChangePlan,
    Memory,
    MemoryChange,
)

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


#: Characters of conversation the stricter retry shows the model (its end).
STRICT_CONVERSATION_CHARS = 3000


def _call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata of a model call: the request id, the lane (a queued job's calls are
    background work) and the key's allowed models."""
    allowed = _ACCOUNT.get()[2]
    return lane.call_metadata() + (((ALLOWED_MODELS_HEADER, allowed),) if allowed else ())


def tenant_of(user_id: str) -> str:
    """The tenant of a gateway-encoded user id (`<len>:<tenant>/<user>`); "" otherwise."""
    size, colon, rest = user_id.partition(":")
    if colon and size.isdigit() and len(rest) > int(size) and rest[int(size)] == "/":
        return rest[: int(size)]
    return ""


ROLE_NAMES = {ROLE_USER: "user", ROLE_ASSISTANT: "assistant"}
#: The messages facts are taken from: the user's own words. As mem0's user
#: memory does, the assistant's replies are not shown: a small model takes its
#: chatter (or its nonsense) for facts about the user.
FACT_ROLES = frozenset({ROLE_USER})


class LlmExtractor:
    """The `Extractor` of the core: bounded, schema-constrained calls through providers."""

    def __init__(
        self, providers: ProvidersStub, timeout: float, *, usage: UsageSink | None = None
    ) -> None:
        self._providers = providers
        self._timeout = timeout
        self._usage = usage
        #: Model calls made, for measurements and tests.
        self.calls = 0

    async def check_allowed(self, model: str, allowed_models: str) -> None:
        """Whether a key limited to `allowed_models` may use `model`, asked of
        providers (which alone knows that `ollama/llama3.2` is
        `ollama/llama3.2:latest`): its GetModel answers NOT_FOUND alike for a
        model outside the allowance and an unknown one, so both are refused,
        as the model call itself would be."""
        try:
            await self._providers.GetModel(
                ppb.GetModelRequest(model=model),
                timeout=self._timeout,
                metadata=(*lane.call_metadata(), (ALLOWED_MODELS_HEADER, allowed_models)),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                raise model_not_allowed(model) from None
            # Unreachable or slow: the job is queued, and its calls carry the
            # same restriction (a refusal then drops it).
            log.info("allowed models not checked now", extra={"code": exc.code().name})

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
        self,
        model: str,
        system: str,
        user: str,
        schema: dict[str, Any],
        *,
        name: str,
        max_tokens: int,
    ) -> str:
        """One model call's answer. BadOutput when the answer is cut off or the model
        refuses the request as too large; UNAVAILABLE (PROVIDER_UNAVAILABLE, with the
        cause's reason and wait in its metadata) when the model cannot be reached."""
        request = ppb.StreamChatCompletionRequest(
            model=model,
            messages=[
                ppb.ChatMessage(role=ppb.ROLE_SYSTEM, content=system),
                ppb.ChatMessage(role=ppb.ROLE_USER, content=user),
            ],
            sampling=ppb.SamplingParameters(temperature=0.0, max_tokens=max_tokens),
            response_format=ppb.ResponseFormat(
                type=ppb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                name=name,
                json_schema_json=json.dumps(schema),
                strict=True,
            ),
        )
        parts: list[str] = []
        last: ppb.StreamChatCompletionResponse | None = None
        finish = ppb.FINISH_REASON_UNSPECIFIED
        started = time.perf_counter()
        self.calls += 1
        try:
            async for chunk in self._providers.StreamChatCompletion(
                request,
                timeout=self._timeout,
                metadata=_call_metadata(),
            ):
                parts.append(chunk.content)
                last = chunk
                if chunk.finish_reason:
                    finish = chunk.finish_reason
        except grpc.aio.AioRpcError as exc:
            self._record(model, last, started, _STATUS.get(exc.code(), 502))
            error = ServiceError.from_rpc_error(exc)
            if error.reason in ("MODEL_NOT_FOUND", "PROVIDER_NOT_FOUND"):
                raise model_not_found(model) from exc
            if error.reason == "MODEL_NOT_ALLOWED":
                # The key's own restriction: no retry will change it.
                raise model_not_allowed(model) from exc
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "".join(parts):
                # It answered, slowly and at length: a loop more than an outage.
                raise BadOutput(f"the answer did not end within {self._timeout:g} s") from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # e.g. the conversation over the model's context: a shorter try may do.
                raise BadOutput(f"the model refused the request ({error.message})") from exc
            raise provider_unavailable("extracting", cause=error) from exc
        self._record(model, last, started, 200)
        if finish == ppb.FINISH_REASON_LENGTH:
            raise BadOutput(f"the answer was cut off at {max_tokens} tokens")
        return "".join(parts)

    async def _ask(
        self,
        model: str,
        system: str,
        tries: Sequence[tuple[str, dict[str, Any], int]],
        *,
        name: str,
        parse: Any,
    ) -> Any:
        """The parsed answer of the first try that gives a usable one: (user content,
        schema, max_tokens) per try; EXTRACTION_FAILED when none does."""
        why = ""
        for user, schema, max_tokens in tries:
            try:
                return parse(
                    await self._complete(
                        model, system, user, schema, name=name, max_tokens=max_tokens
                    )
                )
            except BadOutput as exc:
                why = str(exc)
                log.info("extraction output refused", extra={"model": model, "why": why})
        raise extraction_failed(why)

    async def facts(self, model: str, request: AddRequest) -> list[Fact]:
        lines = [
            f"{ROLE_NAMES[m.role]}: {m.content}"
            for m in request.messages
            if m.role in FACT_ROLES  # never system prompts, tool output, the assistant
        ]
        if not lines:
            return []
        conversation = "Conversation:\n" + "\n".join(lines)
        shorter = "Conversation:\n" + "\n".join(lines)[-STRICT_CONVERSATION_CHARS:]
        result: list[Fact] = await self._ask(
            model,
            FACTS_PROMPT,
            [
                (conversation, facts_schema(FIRST), FIRST.max_tokens),
                (shorter, facts_schema(STRICT), STRICT.max_tokens),
            ],
            name="memory_facts",
            parse=lambda content: parse_facts(content, conversation),
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

        def tried(bounds: Bounds) -> tuple[str, dict[str, Any], int]:
            return payload, decisions_schema(bounds, len(existing), len(facts)), bounds.max_tokens

        result: list[Decision] = await self._ask(
            model,
            DECISIONS_PROMPT,
            [tried(FIRST), tried(STRICT)],
            name="memory_decisions",
            parse=lambda content: parse_decisions(content, len(existing)),
        )
        return result

    async def plan(self, core: MemoryCore, request: AddRequest, model: str) -> ChangePlan:
        """The changes extraction makes for `request` (model calls, vectors), unwritten."""
        account = _ACCOUNT.set(
            (
                request.key_id,
                request.key_owner or tenant_of(request.user_id),
                request.allowed_models,
            )
        )
        try:
            return await self._plan(core, request, model)
        finally:
            _ACCOUNT.reset(account)

    async def _plan(self, core: MemoryCore, request: AddRequest, model: str) -> ChangePlan:
        facts = await self.facts(model, request)
        if not facts:
            return ChangePlan((), ())
        # Facts with a close stored memory are for the model to judge; the others
        # (and those whose exact text is stored: NONE) need no model call.
        direct: list[Decision] = []
        judged: list[Fact] = []
        close: dict[str, Memory] = {}
        for fact in facts:
            if await core.store.find_memory_by_hash(request.user_id, text_hash(fact.text)):
                direct.append(Decision(EVENT_ADD, fact.text, -1))
                continue
            near = await core.close_memories(request.user_id, fact.text)
            if not near:
                direct.append(Decision(EVENT_ADD, fact.text, -1))
                continue
            judged.append(fact)
            for memory in near:
                close.setdefault(memory.id, memory)
        shown = list(close.values())
        decisions = direct
        if judged:
            decisions = [*direct, *await self.decisions(model, shown, judged)]
        return await self._changes(core, request, facts, shown, decisions)

    async def _changes(
        self,
        core: MemoryCore,
        request: AddRequest,
        facts: Sequence[Fact],
        shown: Sequence[Memory],
        decisions: Sequence[Decision],
    ) -> ChangePlan:
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
        # Vectors for every new text; the plan is then written in one transaction.
        vectors = iter(await core.vectors_for(texts))
        final = [
            replace(change, vector=next(vectors)) if change.event != EVENT_DELETE else change
            for change in changes
        ]
        return ChangePlan(tuple(final), tuple(results))
