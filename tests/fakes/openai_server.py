"""A fake OpenAI-compatible server (and, with `huggingface=True`, the Hugging Face router)
speaking the real wire protocol: `/v1/models`, streamed and whole
`/v1/chat/completions` (SSE `data:` events, tool-call deltas, a usage chunk
with `stream_options.include_usage`, `data: [DONE]`), the legacy
`/v1/completions` (`text_completion` objects, `stop` and `max_tokens`
honoured, `suffix` recorded), `logprobs` in chat's and in the legacy shape,
`/v1/embeddings` (texts or token arrays), OpenAI's error envelope. Failures
on cue: see `upstream.py`. With `llama_cpp=True` it answers as llama.cpp's
server does where that differs: legacy completions' `logprobs` in chat's
shape (`{"content": [{token, logprob, bytes, top_logprobs}]}`); its listing's
`meta` is a model's `listing`. With `vllm=True` it names the stop sequence
that ended a reply as vLLM does (the choice's `stop_reason`; null otherwise).

Usage::

    with FakeOpenAI(models=[FakeChatModel("gpt-4o-mini")]) as fake:
        provider = OpenAICompatibleProvider("openai", fake.base_url + "/v1", ...)
        fake.fail_next(Cue.status_error(429, retry_after="1"))
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .upstream import (
    SSE_HEADERS,
    Cue,
    EventWriter,
    FakeUpstream,
    JSONObject,
    StreamedResponse,
    abort,
    cut_reply,
    hang,
    json_response,
    piece_logprob,
    words,
)

CREATED = 1_715_367_049

ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}


@dataclass
class FakeChatModel:
    """One model and how it answers."""

    id: str
    # None: "Hello from <id>! You said: <last user text>".
    reply: str | None = None
    # [{"name": ..., "arguments": {...}}]: streamed as tool-call deltas in fragments.
    tool_calls: list[JSONObject] = field(default_factory=list)
    chunk_delay: float = 0.0
    finish_reason: str | None = None
    embedding_dimension: int = 8
    # Extra fields of the /v1/models entry (HF router: "providers", "architecture").
    listing: JSONObject = field(default_factory=dict)
    # Keep streaming until the client leaves.
    endless: bool = False


def fake_vector(text: str, dimension: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 128) / 128 for i in range(dimension)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def error_body(status: int, message: str, param: str | None = None) -> JSONObject:
    type_, code = ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FakeOpenAI(FakeUpstream):
    """An OpenAI-compatible `/v1` server (`huggingface=True`: the HF router's listing)."""

    def __init__(
        self,
        models: Iterable[FakeChatModel] = (),
        *,
        api_key: str = "test-key",
        huggingface: bool = False,
        llama_cpp: bool = False,
        vllm: bool = False,
    ) -> None:
        super().__init__(api_key=api_key)
        # vLLM: the finishing choice's `stop_reason` names the stop sequence matched.
        self.vllm = vllm
        self.huggingface = huggingface
        # llama.cpp's server: legacy completions' logprobs in chat's shape.
        self.llama_cpp = llama_cpp
        self.models = {m.id: m for m in models}

    def add(self, model: FakeChatModel) -> FakeChatModel:
        self.models[model.id] = model
        return model

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
        ]

    def _unauthorized(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return json_response(401, error_body(401, "Incorrect API key provided: sk-...abcd."))
        return None

    def _model(self, name: Any) -> FakeChatModel | None:
        if not isinstance(name, str):
            return None
        if self.huggingface:
            # Hub ids may carry a routing suffix: ":fastest", ":cheapest", ":groq".
            base, colon, _ = name.rpartition(":")
            if colon and base in self.models:
                return self.models[base]
        return self.models.get(name)

    async def _models(self, request: Request) -> Response:
        await self.record(request)
        if (denied := self._unauthorized(request)) is not None:
            return denied
        data = []
        for model in self.models.values():
            entry: JSONObject = {
                "id": model.id,
                "object": "model",
                "created": CREATED,
                "owned_by": model.id.split("/")[0] if "/" in model.id else "fake",
            }
            entry.update(model.listing)
            data.append(entry)
        return json_response(200, {"object": "list", "data": data})

    def _cue_response(self, cue: Cue | None) -> Response | None:
        if cue is None or cue.kind != "status":
            return None
        headers = {"retry-after": cue.retry_after} if cue.retry_after else None
        message = cue.message or f"fake failure {cue.status}"
        return json_response(cue.status, error_body(cue.status, message, cue.param), headers)

    async def _embeddings(self, request: Request) -> Response:
        body = await self.record(request)
        if (denied := self._unauthorized(request)) is not None:
            return denied
        cue = self.next_cue()
        if (failed := self._cue_response(cue)) is not None:
            return failed
        model = self._model(body.get("model") if isinstance(body, dict) else None)
        if model is None:
            return json_response(404, error_body(404, "The model does not exist."))
        inputs = body.get("input")
        if isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs):
            inputs = [inputs]  # one input as token ids
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not all(isinstance(t, str) or _token_ids(t) for t in texts):
            return json_response(400, error_body(400, "'input' is not valid", "input"))
        # Token arrays embed as their text form: the same ids, the same vector.
        texts = [t if isinstance(t, str) else " ".join(map(str, t)) for t in texts]
        dimension = body.get("dimensions") or model.embedding_dimension
        data = [
            {"object": "embedding", "index": i, "embedding": fake_vector(t, dimension)}
            for i, t in enumerate(texts)
        ]
        tokens = sum(len(t.split()) for t in texts)
        return json_response(
            200,
            {
                "object": "list",
                "data": data,
                "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    async def _chat(self, request: Request) -> Response:
        body = await self.record(request)
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if not isinstance(body, dict):
            return json_response(400, error_body(400, "We could not parse the JSON body."))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return json_response(
                400, error_body(400, "'messages' must be a non-empty array", "messages")
            )
        temperature = body.get("temperature")
        if isinstance(temperature, int | float) and temperature > 2:
            return json_response(
                400,
                error_body(400, "temperature must be at most 2", "temperature"),
            )
        return self._answer(body)

    async def _completions(self, request: Request) -> Response:
        body = await self.record(request)
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return json_response(400, error_body(400, "'prompt' must be a string", "prompt"))
        logprobs = body.get("logprobs")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= 5):
            return json_response(400, error_body(400, "logprobs must be 0 to 5", "logprobs"))
        return self._answer(body, text=True)

    def _answer(self, body: JSONObject, *, text: bool = False) -> Response:
        """A checked chat (or text) completion request's answer, or the failure cued."""
        cue = self.next_cue()
        if (failed := self._cue_response(cue)) is not None:
            return failed
        model = self._model(body.get("model"))
        if model is None:
            message = f"The model `{body.get('model')}` does not exist."
            return json_response(404, error_body(404, message))
        plan = _Plan(self, model, body, cue, text=text)
        return StreamedResponse(self, plan.stream if body.get("stream") else plan.whole)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def _token(piece: str, logprob: float) -> JSONObject:
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}


class _Plan:
    """One chat (or, with `text`, legacy text) completion as the fake will answer it."""

    def __init__(
        self,
        fake: FakeOpenAI,
        model: FakeChatModel,
        body: JSONObject,
        cue: Cue | None,
        *,
        text: bool = False,
    ):
        self.fake = fake
        self.model = model
        self.body = body
        self.cue = cue
        self.text = text
        self.id = f"{'cmpl' if text else 'chatcmpl'}-fake{int(time.time() * 1000)}"
        said = body["prompt"] if text else _last_user_text(body["messages"])
        reply = model.reply
        if reply is None:
            reply = (
                "" if model.tool_calls and not text else f"Hello from {model.id}! You said: {said}"
            )
        stops = body.get("stop")
        found = [
            (reply.find(s), s)
            for s in (stops if isinstance(stops, list) else [stops])
            if isinstance(s, str) and s and s in reply
        ]
        self.matched = min(found, key=lambda f: f[0])[1] if found else None
        reply, self.stopped, limit = cut_reply(reply, stops, body.get("max_tokens"))
        self.pieces = words(reply)
        self.cut_short = limit is not None and limit < len(self.pieces)
        if self.cut_short:
            self.matched = None
        self.pieces = self.pieces[:limit] if limit is not None else self.pieces
        if text:
            self.prompt_tokens = len(body["prompt"].split())
        else:
            self.prompt_tokens = sum(
                len(str(m.get("content") or "").split())
                for m in body["messages"]
                if isinstance(m, dict)
            )
        # Chat: `logprobs: true` (+ `top_logprobs`); legacy: `logprobs: <0..5>`.
        wanted = body.get("logprobs")
        self.logprobs = wanted is not None and wanted is not False
        self.top = (wanted if text else body.get("top_logprobs")) or 0

    def _finish(self) -> str:
        if self.model.finish_reason:
            return self.model.finish_reason
        if self.cut_short:
            return "length"
        return "tool_calls" if self.model.tool_calls and not self.text else "stop"

    def _logprobs(self, start: int, pieces: list[str]) -> JSONObject | None:
        """The choice's `logprobs` for `pieces`, the first at position `start`."""
        if not self.logprobs or not pieces:
            return None
        entries = []
        for offset, piece in enumerate(pieces):
            value = piece_logprob(start + offset)
            alternatives = [(piece, value)] + [
                (f"alt{n}", value - n) for n in range(1, int(self.top))
            ]
            entries.append((piece, value, alternatives[: int(self.top)]))
        if not self.text or self.fake.llama_cpp:
            return {
                "content": [
                    {**_token(p, v), "top_logprobs": [_token(a, av) for a, av in alts]}
                    for p, v, alts in entries
                ],
                "refusal": None,
            }
        offset = sum(len(p) for p in self.pieces[:start])
        offsets = []
        for piece, _, _ in entries:
            offsets.append(offset)
            offset += len(piece)
        return {
            "tokens": [p for p, _, _ in entries],
            "token_logprobs": [v for _, v, _ in entries],
            "top_logprobs": [dict(alts) for _, _, alts in entries],
            "text_offset": offsets,
        }

    def _chunk(
        self, delta: JSONObject, finish: str | None = None, logprobs: JSONObject | None = None
    ) -> bytes:
        choice: JSONObject
        if self.text:
            choice = {"text": delta.get("content", ""), "index": 0}
        else:
            choice = {"index": 0, "delta": delta}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        if finish and self.fake.vllm:
            choice["stop_reason"] = self.matched
        event = {
            "id": self.id,
            "object": "text_completion" if self.text else "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [choice],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    async def _before_first_byte(self, writer: EventWriter) -> None:
        if self.cue is not None and self.cue.kind == "hang":
            await hang(writer)
        if self.cue is not None and self.cue.kind == "slow_first":
            await writer.pause(self.cue.seconds)

    async def stream(self, writer: EventWriter) -> None:
        await self._before_first_byte(writer)
        await writer.start(200, SSE_HEADERS)
        if self.cue is not None and self.cue.kind == "die_after_head":
            abort()
        if self.cue is not None and self.cue.kind == "slow_first_chunk":
            await writer.pause(self.cue.seconds)
        if not self.text:
            await writer.write(self._chunk({"role": "assistant", "content": ""}))
        await writer.write(b": keep-alive\n\n")
        sent = 0
        pieces = list(self.pieces)
        while pieces or self.model.endless:
            piece = pieces.pop(0) if pieces else " more"
            if self.cue is not None and self.cue.kind == "die_after" and sent >= self.cue.events:
                abort()
            if self.model.chunk_delay:
                await writer.pause(self.model.chunk_delay)
            await writer.write(self._chunk({"content": piece}, None, self._logprobs(sent, [piece])))
            sent += 1
        for index, call in enumerate([] if self.text else self.model.tool_calls):
            arguments = json.dumps(call.get("arguments", {}))
            head = {
                "index": index,
                "id": f"call_fake{index}",
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            await writer.write(self._chunk({"tool_calls": [head]}))
            middle = len(arguments) // 2
            for fragment in (arguments[:middle], arguments[middle:]):
                await writer.write(
                    self._chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                    )
                )
        await writer.write(self._chunk({}, self._finish()))
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": sent,
                "total_tokens": self.prompt_tokens + sent,
            }
            event = {
                "id": self.id,
                "object": "text_completion" if self.text else "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.body["model"],
                "choices": [],
                "usage": usage,
            }
            await writer.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await writer.write(b"data: [DONE]\n\n")

    async def whole(self, writer: EventWriter) -> None:
        await self._before_first_byte(writer)
        message: JSONObject = {"role": "assistant", "content": "".join(self.pieces) or None}
        if self.model.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_fake{i}",
                    "type": "function",
                    "function": {
                        "name": c["name"],
                        "arguments": json.dumps(c.get("arguments", {})),
                    },
                }
                for i, c in enumerate(self.model.tool_calls)
            ]
        completion = len(self.pieces)
        choice: JSONObject = {"index": 0, "message": message}
        if self.text:
            choice = {"text": "".join(self.pieces), "index": 0}
        choice["logprobs"] = self._logprobs(0, self.pieces)
        choice["finish_reason"] = self._finish()
        if self.fake.vllm:
            choice["stop_reason"] = self.matched
        body = {
            "id": self.id,
            "object": "text_completion" if self.text else "chat.completion",
            "created": int(time.time()),
            "model": self.body["model"],
            "choices": [choice],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
            },
        }
        await writer.start(200, [(b"content-type", b"application/json")])
        if self.cue is not None and self.cue.kind == "slow_first_chunk":
            await writer.pause(self.cue.seconds)
        await writer.write(json.dumps(body).encode())
