"""OpenAI's legacy text completions, `POST /v1/completions`, over the providers'
`StreamCompletion`: one call per choice (prompts times `n`), opened at once and
relayed as one stream by the chat route's machinery (limits, usage, metrics,
cancellation on disconnect)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_CHAT
from marie_gateway.core import Gateway
from marie_gateway.http import caching
from marie_gateway.http.bodies import parse_body
from marie_gateway.http.sse import EventStreamResponse
from marie_gateway.openai.generation import GenerationCall, add_usage, relay
from marie_gateway.openai.mapping import FINISH_REASONS, fill_sampling, text_logprobs, usage_dict
from marie_gateway.openai.schemas import CompletionRequest

TextCall = grpc.aio.UnaryStreamCall[pb.StreamCompletionRequest, pb.StreamCompletionResponse]


class CallChain:
    """Several streaming calls read one after the other as one stream, the way the
    relay reads one call. All are opened at once, so the upstreams generate
    concurrently; `index` is the call being read (the choice's index)."""

    def __init__(self, calls: Sequence[TextCall]) -> None:
        self._calls = calls
        self.index = 0

    async def read(self) -> Any:
        while True:
            chunk = await self._calls[self.index].read()
            if chunk is not grpc.aio.EOF or self.index == len(self._calls) - 1:
                return chunk
            self.index += 1

    async def initial_metadata(self) -> Any:
        """The first call's: the answer starts with it (the others' failures
        come after its chunks, as events)."""
        return await self._calls[0].initial_metadata()

    def cancel(self) -> bool:
        return any([call.cancel() for call in self._calls])


class TextDialect:
    """`text_completion` answers and events, one choice per call of `chain`."""

    chunk_type = pb.StreamCompletionResponse
    chunk_object = "text_completion"

    def __init__(self, chain: CallChain, choices: int, *, logprobs: bool) -> None:
        self._chain = chain
        self._logprobs = logprobs
        self._texts: list[list[str]] = [[] for _ in range(choices)]
        self._tokens: list[list[pb.TokenLogprob]] = [[] for _ in range(choices)]
        self._finish: list[str | None] = [None] * choices
        # Characters of each choice already streamed: where its next token starts.
        self._sent = [0] * choices
        self._usage: pb.Usage | None = None

    def _choice_logprobs(
        self, text: str, tokens: Sequence[pb.TokenLogprob], before: int
    ) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        # The tokens are the generated end of `text` (an echoed prompt comes first).
        start = before + len(text) - sum(len(t.token) for t in tokens)
        return text_logprobs(tokens, start)

    def event(
        self, head: dict[str, Any], chunk: pb.StreamCompletionResponse
    ) -> dict[str, Any] | None:
        index = self._chain.index
        finish = FINISH_REASONS.get(chunk.finish_reason)
        if not (chunk.text or finish or chunk.logprobs):
            return None
        logprobs = self._choice_logprobs(chunk.text, chunk.logprobs, self._sent[index])
        self._sent[index] += len(chunk.text)
        choice = {"text": chunk.text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "model": chunk.model, "choices": [choice]}

    def add(self, chunk: pb.StreamCompletionResponse) -> None:
        index = self._chain.index
        self._texts[index].append(chunk.text)
        self._tokens[index].extend(chunk.logprobs)
        if chunk.finish_reason:
            self._finish[index] = FINISH_REASONS.get(chunk.finish_reason)
        if chunk.HasField("usage"):
            self._usage = add_usage(self._usage, chunk.usage)

    def whole(self, completion_id: str, created: int, model: str) -> dict[str, Any]:
        choices = []
        for index, parts in enumerate(self._texts):
            text = "".join(parts)
            choices.append(
                {
                    "text": text,
                    "index": index,
                    "logprobs": self._choice_logprobs(text, self._tokens[index], 0),
                    "finish_reason": self._finish[index] or "stop",
                }
            )
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if self._usage is not None:
            out["usage"] = usage_dict(self._usage)
        return out


def completion_request_to_proto(
    body: CompletionRequest, prompt: str, completion_id: str, *, aggregate: bool
) -> pb.StreamCompletionRequest:
    """The providers request for one prompt of a legacy completion."""
    req = pb.StreamCompletionRequest(
        model=body.model,
        prompt=prompt,
        suffix=body.suffix or "",
        echo=body.echo,
        user=body.user or "",
        completion_id=completion_id,
        aggregate=aggregate,
    )
    if body.logprobs is not None:
        req.logprobs = body.logprobs
    fill_sampling(req.sampling, body, body.max_tokens)
    return req


class CompletionRoutes:
    """`POST /v1/completions` over the providers service."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/completions", self.completions, methods=["POST"])]

    async def completions(self, request: Request) -> Response | EventStreamResponse:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_CHAT)
        tally = await gw.admit(request, principal, "completions")
        body = parse_body(CompletionRequest, await gw.read_body(request))
        tally.requested = body.model
        completion_id = "cmpl-" + secrets.token_hex(12)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        policy = caching.request_policy(request.headers)
        if body.n > 1:
            # n samples of one prompt are n answers: a cache would make them one.
            policy = pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS)
        stub = gw.backends().providers
        metadata = principal.model_call_metadata()
        calls: list[TextCall] = []
        for prompt in prompts:
            proto = completion_request_to_proto(
                body, prompt, completion_id, aggregate=not body.stream
            )
            if policy is not None:
                proto.cache.CopyFrom(policy)
            calls.extend(
                stub.StreamCompletion(
                    proto, timeout=gw.settings.request_timeout_seconds, metadata=metadata
                )
                for _ in range(body.n)
            )
        chain = CallChain(calls)
        return await relay(
            GenerationCall(gw, request, chain, pb.StreamCompletionResponse, tally),
            TextDialect(chain, len(calls), logprobs=body.logprobs is not None),
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
