"""Stop sequences found in relayed text (`upstream.stops`): the matcher
holds back only what could still begin a sequence, and a reply is ended at
the first match with the sequence named and the upstream closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from marie.providers.v1 import provider_service_pb2 as pb
from marie_providers.upstream.stops import StopMatcher, matching_stops, without_stops


def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out.append(text)
        if matched is not None:
            return out, matched
    out.append(matcher.flush())
    return out, None


def test_text_that_cannot_begin_a_stop_goes_out_at_once() -> None:
    assert feed_all(["END"], ["Hello", " world"]) == (["Hello", " world", ""], None)


def test_a_stop_across_pieces_is_held_back_then_matched() -> None:
    out, matched = feed_all(["is 42"], ["The", " answer", " is", " 42", " then"])
    assert matched == "is 42"
    assert "".join(out) == "The answer "
    # " is" was held while it could begin the sequence.
    assert out[2] == " "


def test_a_held_start_that_never_completes_is_given_at_the_end() -> None:
    assert "".join(feed_all(["done. More"], ["All", " done."])[0]) == "All done."


def test_the_earliest_match_wins_whatever_the_order_of_the_stops() -> None:
    assert feed_all(["b", "a"], ["xxabxx"]) == (["xx"], "a")


def test_a_prefix_repeated_is_held_only_as_far_as_it_could_match() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.feed("xaaa") == ("xa", None)
    assert matcher.feed("b!") == ("", "aab")


def test_without_stops_streams_and_keeps_the_rest() -> None:
    request = pb.StreamChatCompletionRequest(model="m", aggregate=True)
    request.sampling.stop.append("END")
    request.sampling.max_tokens = 5
    upstream = without_stops(request)
    assert not upstream.sampling.stop and not upstream.aggregate
    assert upstream.sampling.max_tokens == 5 and request.sampling.stop == ["END"]


def test_matching_stops_ends_the_reply_and_closes_the_upstream() -> None:
    closed = []

    async def upstream() -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        try:
            yield pb.StreamChatCompletionResponse(role=pb.ROLE_ASSISTANT, content="Hi E")
            yield pb.StreamChatCompletionResponse(content="ND and on")
            yield pb.StreamChatCompletionResponse(content="never read")
        finally:
            closed.append(True)

    request = pb.StreamChatCompletionRequest(model="m")
    request.messages.add(role=pb.ROLE_USER, content="x" * 40)
    request.sampling.stop.append("END")

    async def run() -> list[pb.StreamChatCompletionResponse]:
        return [c async for c in matching_stops(upstream(), request)]

    chunks = asyncio.run(run())
    assert "".join(c.content for c in chunks) == "Hi "
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stop_sequence == "END"
    # No usage came before the match: the estimate (40 characters, 1 message).
    assert last.usage.prompt_tokens == 14 and last.usage.completion_tokens == 2
    assert closed == [True]


def test_matching_stops_passes_a_reply_without_a_match() -> None:
    async def upstream() -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        yield pb.StreamChatCompletionResponse(role=pb.ROLE_ASSISTANT, content="all E")
        yield pb.StreamChatCompletionResponse(
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        )

    request = pb.StreamChatCompletionRequest(model="m")
    request.sampling.stop.append("END")

    async def run() -> list[pb.StreamChatCompletionResponse]:
        return [c async for c in matching_stops(upstream(), request)]

    chunks = asyncio.run(run())
    assert [c.content for c in chunks] == ["all ", "E"]
    assert chunks[-1].stop_sequence == "" and chunks[-1].usage.completion_tokens == 2
