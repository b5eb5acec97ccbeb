"""Proto messages ⇄ the core's records."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from marie.memory.v1 import memory_service_pb2 as pb

from marie_memory.core import ScoredHit
from marie_memory.job_payload import decode_results
from marie_memory.records import (
    JOB_QUEUED,
    AddRequest,
    AddResult,
    Conversation,
    ExtractionJob,
    HistoryEntry,
    Memory,
    MemoryFilter,
    Message,
    ScoredMemory,
    SourceMessage,
    ToolCall,
)


def timestamp(unix_seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(round(unix_seconds * 1e9))
    return ts


def conversation_to_proto(c: Conversation) -> pb.Conversation:
    return pb.Conversation(
        id=c.id,
        user_id=c.user_id,
        title=c.title,
        provider=c.provider,
        model=c.model,
        create_time=timestamp(c.create_time),
        update_time=timestamp(c.update_time),
        message_count=c.message_count,
        metadata=dict(c.metadata),
    )


def conversation_from_proto(c: pb.Conversation) -> Conversation:
    return Conversation(
        id=c.id,
        user_id=c.user_id,
        title=c.title,
        provider=c.provider,
        model=c.model,
        metadata=dict(c.metadata),
    )


def message_to_proto(m: Message) -> pb.Message:
    return pb.Message(
        id=m.id,
        conversation_id=m.conversation_id,
        role=m.role,  # type: ignore[arg-type]
        content=m.content,
        provider=m.provider,
        model=m.model,
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens,
        create_time=timestamp(m.create_time),
        metadata=dict(m.metadata),
        position=m.position,
        name=m.name,
        tool_calls=[
            pb.ToolCall(id=c.id, function_name=c.function_name, arguments=c.arguments)
            for c in m.tool_calls
        ],
        tool_call_id=m.tool_call_id,
    )


def message_from_proto(m: pb.Message) -> Message:
    return Message(
        id="",
        conversation_id="",
        role=int(m.role),
        content=m.content,
        provider=m.provider,
        model=m.model,
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens,
        metadata=dict(m.metadata),
        name=m.name,
        tool_calls=tuple(ToolCall(c.id, c.function_name, c.arguments) for c in m.tool_calls),
        tool_call_id=m.tool_call_id,
    )


def hit_to_proto(hit: ScoredHit) -> pb.MessageSearchHit:
    return pb.MessageSearchHit(
        message=message_to_proto(hit.message),
        conversation_id=hit.message.conversation_id,
        conversation_title=hit.conversation_title,
        score=hit.score,
        snippets=list(hit.snippets),
    )


def memory_to_proto(m: Memory) -> pb.Memory:
    return pb.Memory(
        id=m.id,
        user_id=m.user_id,
        text=m.text,
        categories=list(m.categories),
        metadata=dict(m.metadata),
        source_conversation_id=m.source_conversation_id,
        source_message_ids=list(m.source_message_ids),
        hash=m.hash,
        create_time=timestamp(m.create_time),
        update_time=timestamp(m.update_time),
    )


def memory_from_proto(m: pb.Memory) -> Memory:
    return Memory(
        id=m.id,
        user_id="",
        text=m.text,
        hash="",
        categories=tuple(m.categories),
        metadata=dict(m.metadata),
    )


def scored_to_proto(s: ScoredMemory) -> pb.ScoredMemory:
    return pb.ScoredMemory(memory=memory_to_proto(s.memory), score=s.score)


def filter_from_proto(f: pb.MemoryFilter) -> MemoryFilter:
    return MemoryFilter(
        metadata=dict(f.metadata),
        categories=tuple(f.categories),
        source_conversation_id=f.source_conversation_id,
    )


def history_to_proto(h: HistoryEntry) -> pb.MemoryHistoryEntry:
    return pb.MemoryHistoryEntry(
        id=h.id,
        memory_id=h.memory_id,
        event=h.event,  # type: ignore[arg-type]
        old_text=h.old_text,
        new_text=h.new_text,
        create_time=timestamp(h.create_time),
        actor=h.actor,
        inferred=h.inferred,
    )


def add_request_from_proto(
    r: pb.AddMemoriesRequest, identity: tuple[str, str] = ("", ""), allowed_models: str = ""
) -> AddRequest:
    """The core's request; `identity` is the caller's (key id, owner),
    `allowed_models` its key's allowed models as the call's metadata said."""
    return AddRequest(
        user_id=r.user_id,
        messages=tuple(SourceMessage(int(m.role), m.content, m.message_id) for m in r.messages),
        infer=r.infer if r.HasField("infer") else True,
        extraction_provider=r.extraction_provider,
        extraction_model=r.extraction_model,
        categories=tuple(r.categories),
        metadata=dict(r.metadata),
        conversation_id=r.conversation_id,
        actor=r.actor,
        key_id=identity[0],
        key_owner=identity[1],
        allowed_models=allowed_models,
        request_id=r.request_id,
    )


def add_result_to_proto(result: AddResult) -> pb.AddMemoriesResult:
    return pb.AddMemoriesResult(
        event=result.event,  # type: ignore[arg-type]
        memory=memory_to_proto(result.memory),
        previous_text=result.previous_text,
    )


def job_to_proto(job: ExtractionJob) -> pb.ExtractionJob:
    out = pb.ExtractionJob(
        id=job.id,
        state=job.state,  # type: ignore[arg-type]
        attempts=job.attempts,
        last_error=job.last_error,
        create_time=timestamp(job.create_time),
        failure_reason=job.failure_reason,
        results=[add_result_to_proto(r) for r in decode_results(job.results)],
    )
    if job.state == JOB_QUEUED:
        out.next_attempt_time.CopyFrom(timestamp(job.next_attempt_time))
    else:
        out.finish_time.CopyFrom(timestamp(job.finish_time))
    return out
