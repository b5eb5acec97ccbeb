"""Stop sequences found by the service in the text it relays, for upstreams
that stop at them without saying which one matched (Ollama, llama.cpp):
a request's `report_stop_sequence` (see the proto) keeps them from the
upstream and ends the reply here, at the first match."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from marie.providers.v1 import provider_service_pb2 as pb

#: Characters per token of the usage estimate of a reply ended here before
#: the upstream reported its usage: the usual figure for English text.
CHARS_PER_TOKEN = 4
#: Tokens a chat template adds around each message, for the estimate.
TOKENS_PER_MESSAGE = 4


class StopMatcher:
    """Finds the first of some stop sequences in text fed piece by piece.

    What it hands back is the text before any match; it holds back only the
    end that could still be the start of a sequence (at most the longest
    sequence less one character), so text reaches the caller as soon as it
    can no longer be part of a stop."""

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """The text now safe to relay, and the sequence matched (None: none yet).
        After a match, the text past it is dropped."""
        text = self._held + text
        found: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            # The earliest match wins; at one position, the one listed first.
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is not None:
            self._held = ""
            return text[: found[0]], found[1]
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:size]):
                    keep = size
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return (text[: len(text) - keep] if keep else text), None

    def flush(self) -> str:
        """The text held back, at the end of the reply (it began no stop)."""
        held, self._held = self._held, ""
        return held


def without_stops(request: pb.StreamChatCompletionRequest) -> pb.StreamChatCompletionRequest:
    """`request` as sent to an upstream that must not stop by itself: no stop
    sequences, and streamed (a whole reply could not be cut short)."""
    upstream = pb.StreamChatCompletionRequest()
    upstream.CopyFrom(request)
    del upstream.sampling.stop[:]
    upstream.aggregate = False
    return upstream


def estimated_prompt_tokens(request: pb.StreamChatCompletionRequest) -> int:
    """About how many tokens the prompt is (characters over four, plus a
    template's few per message)."""
    chars = 0
    for message in request.messages:
        chars += len(message.content) + sum(len(p.text) for p in message.parts)
        for call in message.tool_calls:
            chars += len(call.function.name) + len(call.function.arguments)
    for tool in request.tools:
        fn = tool.function
        chars += len(fn.name) + len(fn.description) + len(fn.parameters_json)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(request.messages)


async def matching_stops(
    chunks: AsyncGenerator[pb.StreamChatCompletionResponse, None],
    request: pb.StreamChatCompletionRequest,
) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
    """`chunks` (from an upstream sent `without_stops(request)`) ended at the
    first of the request's stop sequences: the text before it, then a last
    chunk with finish reason STOP and the sequence; the upstream request is
    closed there. A reply that meets none passes unchanged, but for text held
    back a moment while it could have begun one."""
    matcher = StopMatcher(request.sampling.stop)
    relayed = 0
    async with aclosing(chunks):
        async for chunk in chunks:
            if chunk.content:
                text, matched = matcher.feed(chunk.content)
                relayed += len(text)
                if matched is not None:
                    if text or chunk.role:
                        before = pb.StreamChatCompletionResponse(
                            id=chunk.id,
                            model=chunk.model,
                            provider=chunk.provider,
                            created=chunk.created,
                            role=chunk.role,
                            content=text,
                            block=chunk.block,
                        )
                        yield before
                    yield _stopped(chunk, matched, request, relayed)
                    return
                chunk.content = text
            if chunk.tool_calls or chunk.finish_reason:
                # No text follows a tool call or the end: what was held began no stop.
                chunk.content += matcher.flush()
            if (
                chunk.content
                or chunk.role
                or chunk.tool_calls
                or chunk.finish_reason
                or chunk.HasField("usage")
                or chunk.logprobs
            ):
                yield chunk


def _stopped(
    chunk: pb.StreamChatCompletionResponse,
    matched: str,
    request: pb.StreamChatCompletionRequest,
    relayed: int,
) -> pb.StreamChatCompletionResponse:
    """The last chunk of a reply ended at `matched`, with the usage so far."""
    last = pb.StreamChatCompletionResponse(
        id=chunk.id,
        model=chunk.model,
        provider=chunk.provider,
        created=chunk.created,
        finish_reason=pb.FINISH_REASON_STOP,
        stop_sequence=matched,
    )
    if chunk.HasField("usage"):
        last.usage.CopyFrom(chunk.usage)
    else:
        prompt = estimated_prompt_tokens(request)
        # The sequence itself was generated too.
        completion = math.ceil((relayed + len(matched)) / CHARS_PER_TOKEN)
        last.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
        )
    return last
