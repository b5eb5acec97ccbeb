"""Operations on completion chunks that every provider shares."""

from __future__ import annotations

from marie.providers.v1 import provider_service_pb2 as pb


class ChunkMerger:
    """Merges consecutive chunks where one chunk can say what several do.

    Content-only chunks join the chunk before them (which may carry the role),
    and the last chunk's finish reason and usage join the content before it —
    exactly the shape OpenAI streams have. Tool-call chunks stay on their own;
    token log probabilities follow the content they belong to.
    Content is joined once, when a merged chunk is handed out. Thinking,
    upstream blocks and citations stay on their own, and content of another
    upstream block (`block`) starts a chunk of its own.
    """

    __slots__ = ("_parts", "_pending")

    def __init__(self) -> None:
        self._pending: pb.StreamChatCompletionResponse | None = None
        self._parts: list[str] = []

    def add(self, chunk: pb.StreamChatCompletionResponse) -> pb.StreamChatCompletionResponse | None:
        """Take `chunk`; returns the previous merged chunk when `chunk` cannot join it."""
        pending = self._pending
        if (
            pending is not None
            and not (
                pending.finish_reason
                or pending.tool_calls
                or chunk.tool_calls
                or chunk.role
                or _has_blocks(pending)
                or _has_blocks(chunk)
            )
            and (not pending.block or not chunk.block or pending.block == chunk.block)
        ):
            if chunk.block:
                pending.block = chunk.block
            self._parts.append(chunk.content)
            if chunk.finish_reason:
                pending.finish_reason = chunk.finish_reason
                pending.stop_sequence = chunk.stop_sequence
            if chunk.HasField("usage"):
                pending.usage.CopyFrom(chunk.usage)
            if chunk.logprobs:
                pending.logprobs.extend(chunk.logprobs)
            return None
        if (
            pending is not None
            and chunk.upstream_input_json
            and pending.upstream_input_json
            and pending.block == chunk.block
            and _only_input(chunk)
        ):
            # A server tool's input streamed in fragments: one fragment.
            self._parts.append(chunk.upstream_input_json)
            return None
        done = self.flush()
        self._pending = chunk
        self._parts = [chunk.upstream_input_json or chunk.content]
        return done

    def flush(self) -> pb.StreamChatCompletionResponse | None:
        """The merged chunk held so far, if any; the merger is empty afterwards."""
        pending, self._pending = self._pending, None
        if pending is not None and len(self._parts) > 1:
            if pending.upstream_input_json:
                pending.upstream_input_json = "".join(self._parts)
            else:
                pending.content = "".join(self._parts)
        self._parts = []
        return pending


def _has_blocks(chunk: pb.StreamChatCompletionResponse) -> bool:
    """Whether `chunk` carries thinking, an upstream block (or its input) or citations."""
    return bool(
        chunk.HasField("reasoning")
        or chunk.upstream_block_json
        or chunk.upstream_input_json
        or chunk.citations_json
    )


def _only_input(chunk: pb.StreamChatCompletionResponse) -> bool:
    """Whether `chunk` carries nothing but a fragment of an upstream block's input."""
    return not (
        chunk.content
        or chunk.role
        or chunk.tool_calls
        or chunk.finish_reason
        or chunk.HasField("usage")
        or chunk.HasField("reasoning")
        or chunk.upstream_block_json
        or chunk.citations_json
    )
