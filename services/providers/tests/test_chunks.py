"""ChunkMerger: consecutive chunks merge where OpenAI's stream shape allows."""

from __future__ import annotations

from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.upstream.chunks import ChunkMerger

Chunk = pb.StreamChatCompletionResponse


def _merge(*chunks: Chunk) -> list[Chunk]:
    merger = ChunkMerger()
    out = [ready for c in chunks if (ready := merger.add(c)) is not None]
    if (last := merger.flush()) is not None:
        out.append(last)
    return out


def test_content_joins_the_chunk_with_the_role() -> None:
    (merged,) = _merge(
        Chunk(role=pb.ROLE_ASSISTANT, content="Hel"), Chunk(content="lo"), Chunk(content="!")
    )
    assert (merged.role, merged.content) == (pb.ROLE_ASSISTANT, "Hello!")


def test_finish_reason_and_usage_join_the_last_content() -> None:
    usage = pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    (merged,) = _merge(
        Chunk(content="a"), Chunk(content="b", finish_reason=pb.FINISH_REASON_STOP, usage=usage)
    )
    assert merged.content == "ab"
    assert merged.finish_reason == pb.FINISH_REASON_STOP
    assert merged.usage == usage


def test_tool_call_chunks_stay_on_their_own() -> None:
    call = pb.ToolCallDelta(index=0, id="call_1", name="f", arguments="{}")
    out = _merge(
        Chunk(content="x"),
        Chunk(tool_calls=[call]),
        Chunk(finish_reason=pb.FINISH_REASON_TOOL_CALLS),
    )
    assert [(c.content, len(c.tool_calls), c.finish_reason) for c in out] == [
        ("x", 0, pb.FINISH_REASON_UNSPECIFIED),
        ("", 1, pb.FINISH_REASON_UNSPECIFIED),
        ("", 0, pb.FINISH_REASON_TOOL_CALLS),
    ]


def test_nothing_follows_a_finished_chunk_into_it() -> None:
    out = _merge(Chunk(content="a", finish_reason=pb.FINISH_REASON_STOP), Chunk(content="b"))
    assert [c.content for c in out] == ["a", "b"]


def test_flush_empties_the_merger() -> None:
    merger = ChunkMerger()
    assert merger.add(Chunk(content="a")) is None
    flushed = merger.flush()
    assert flushed is not None and flushed.content == "a"
    assert merger.flush() is None


def test_logprobs_follow_the_content_they_belong_to() -> None:
    first, second = pb.TokenLogprob(token="a", logprob=-0.1), pb.TokenLogprob(token="b")
    (merged,) = _merge(Chunk(content="a", logprobs=[first]), Chunk(content="b", logprobs=[second]))
    assert merged.content == "ab"
    assert list(merged.logprobs) == [first, second]
