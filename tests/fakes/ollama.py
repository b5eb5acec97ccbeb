"""A fake Ollama server that speaks Ollama's real HTTP wire protocol.

It is a fake at the network boundary: a real HTTP/1.1 server (starlette app
served by uvicorn with httptools) listening on 127.0.0.1 on an ephemeral
port, running in a background thread with its own event loop. Because of
that it serves synchronous tests and async tests alike, and the test's own
event loop is never blocked by it.

The shapes follow /work/shared/docs/PROTOCOLS.md ("Ollama") and Ollama's Go
types (``api/types.go``): NDJSON streaming for ``/api/chat``, tool calls with
an arguments *object* and no id, a mid-stream error as an ``{"error": ...}``
line while the status stays 200, counts and durations that are omitted when
zero (Go ``omitempty``), timestamps in Go's RFC3339Nano format.

Usage::

    with FakeOllama() as fake:
        httpx.post(f"{fake.base_url}/api/chat", json={...})
        fake.set_model("llama3.2:latest", reply="Hi!", chunk_delay=0.01)
        assert fake.chat_requests[-1].body["model"] == "llama3.2"

`/api/generate` answers like `/api/chat` (text in `response`, `context` on
the last line unless `raw`), honouring `options.stop` and `num_predict`; both
report `logprobs` (one token per streamed piece, see `piece_logprob`) when the
request asks for them.

Chat behaviour is scripted per model (see :class:`FakeModel`), so one server
can serve many scenarios at once: give each scenario its own model name.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tests.fakes.structured import structured_answer
from tests.fakes.upstream import cut_reply, piece_logprob

__all__ = [
    "FakeModel",
    "FakeOllama",
    "RecordedRequest",
    "default_models",
    "fake_embedding",
    "piece_logprob",
    "split_reply",
]

JSONObject = dict[str, Any]

NDJSON_MEDIA_TYPE = "application/x-ndjson"
# Gin's c.JSON sends the charset; keep it so clients see the real header.
JSON_MEDIA_TYPE = "application/json; charset=utf-8"

# A fixed, non-UTC timestamp: makes clients parse an offset, as they must
# with a real Ollama, which reports local time.
_DEFAULT_MODIFIED_AT = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=timezone(timedelta(hours=1)))

# Between lines of an endless stream when no chunk_delay is set: small enough
# to be quick, large enough not to spin the loop and flood the socket.
_ENDLESS_DEFAULT_DELAY = 0.01

# Deterministic fake timings (ns), so that tests can assert on them.
_LOAD_DURATION_NS = 1_000_000
_PROMPT_EVAL_NS_PER_TOKEN = 1_000_000
_EVAL_NS_PER_TOKEN = 10_000_000
_OVERHEAD_NS = 500_000


@dataclass
class FakeModel:
    """One model the fake knows about, and how it behaves on /api/chat.

    Metadata fields feed /api/tags, /api/show and /api/ps. Behaviour fields
    script /api/chat (and, for delays and ``status_error``, /api/embed).
    """

    name: str
    family: str = "llama"
    # None means [family], which is what Ollama reports for most models.
    families: list[str] | None = None
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    size: int = 2_019_393_189
    # None means a digest derived from the name (64 hex digits, no prefix).
    digest: str | None = None
    format: str = "gguf"
    parent_model: str = ""
    context_length: int = 131_072
    # Also the length of the vectors /api/embed returns for this model.
    embedding_dimension: int = 768
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    # model_info["general.architecture"]; None means the family.
    architecture: str | None = None
    modified_at: datetime = _DEFAULT_MODIFIED_AT
    # None means a Modelfile generated from the other fields.
    modelfile: str | None = None
    parameters: str = 'stop                           "<|eot_id|>"'
    template: str = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
    license: str = ""

    # --- /api/chat behaviour ---
    # None means "Hello from <model>! You said: <last message content>".
    reply: str | None = None
    # Replies used once each, first in first out, before `reply` (e.g. a bad
    # JSON answer, then a good one).
    replies: list[str] = field(default_factory=list)
    # Returned in message.tool_calls, verbatim: [{"function": {"name": ...,
    # "arguments": {...}}}]. With tool calls and reply None the content is "".
    tool_calls: list[JSONObject] = field(default_factory=list)
    # A real model answers a tool result with text rather than calling the
    # tool again; that is the default, so agent loops terminate. Set True to
    # return tool_calls even when the last message has role "tool".
    tool_calls_after_tool_result: bool = False
    # A scripted agent: for each request that offers tools, the next entry is
    # the answer's tool calls (an empty list: a text reply), first in first
    # out, before `tool_calls`. Requests without tools (a client's background
    # calls) leave the script alone.
    tool_call_turns: list[list[JSONObject]] = field(default_factory=list)
    chunk_delay: float = 0.0
    first_byte_delay: float = 0.0
    # After this many content lines, send {"error": error_message} and end
    # the stream, status still 200. With stream:false: HTTP 500 instead.
    error_after: int | None = None
    error_message: str = "an error was encountered while running the model: unexpected EOF"
    # Answer the whole request (chat and embed) with this status and
    # {"error": message}.
    status_error: tuple[int, str] | None = None
    # Refuse /api/embed when any input is longer than this many characters:
    # 500 with the error of a server whose batch is too small for it (what
    # llama.cpp says of an input over its physical batch size).
    max_input_chars: int | None = None
    # Answer /api/show for this model with this status and {"error": message}.
    show_error: tuple[int, str] | None = None
    # Keep streaming content lines until the client disconnects (or the
    # server stops). With stream:false: never answer.
    endless: bool = False
    done_reason: Literal["stop", "length"] = "stop"
    # Overrides; None means derived (words in all messages / lines sent).
    # 0 makes the field disappear, as Ollama's omitempty does.
    prompt_eval_count: int | None = None
    eval_count: int | None = None

    def resolved_digest(self) -> str:
        return self.digest or hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> JSONObject:
        return {
            "parent_model": self.parent_model,
            "format": self.format,
            "family": self.family,
            "families": list(self.families) if self.families is not None else [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


def default_models() -> list[FakeModel]:
    """A small, realistic model set: two chat models with tools, one chat
    model without tools, one embedding model."""
    return [
        FakeModel(
            name="llama3.2:latest",
            family="llama",
            parameter_size="3.2B",
            quantization_level="Q4_K_M",
            size=2_019_393_189,
            digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            context_length=131_072,
            embedding_dimension=3072,
            capabilities=["completion", "tools"],
        ),
        FakeModel(
            name="qwen2.5:0.5b",
            family="qwen2",
            parameter_size="494.03M",
            quantization_level="Q4_K_M",
            size=397_821_319,
            context_length=32_768,
            embedding_dimension=896,
            capabilities=["completion", "tools"],
            parameters="",
            template="{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n",
        ),
        FakeModel(
            name="gemma3:1b",
            family="gemma3",
            parameter_size="999.89M",
            quantization_level="Q4_K_M",
            size=815_319_791,
            context_length=32_768,
            embedding_dimension=1152,
            capabilities=["completion"],
            parameters='stop                           "<end_of_turn>"\n'
            "temperature                    1",
        ),
        FakeModel(
            name="nomic-embed-text:latest",
            family="nomic-bert",
            parameter_size="137M",
            quantization_level="F16",
            size=274_302_450,
            context_length=2048,
            embedding_dimension=768,
            capabilities=["embedding"],
            parameters="num_ctx                        8192",
            template="{{ .Prompt }}",
        ),
    ]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received (every path, including errors)."""

    method: str
    path: str
    query: dict[str, str]
    # Lower-cased names; repeated headers joined with ", ".
    headers: dict[str, str]
    # Parsed JSON body; None when the body was empty or not valid JSON.
    body: Any
    raw_body: bytes


def _seeded_unit(seed_text: str, dimension: int) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) for _ in range(dimension)]


def fake_embedding(text: str, dimension: int) -> list[float]:
    """The deterministic unit vector /api/embed returns for ``text``.

    It depends only on the text and the dimension (not on the model), so a
    test can compute the expected vector. Texts that share words are near:
    the vector is the normalised sum of one fixed random vector per distinct
    lower-cased word (a text without words gets a vector of its own). Like
    Ollama's /api/embed, vectors are L2-normalised.
    """
    words = sorted(set(re.findall(r"\w+", text.lower())))
    if not words:
        vector = _seeded_unit(text, dimension)
    else:
        vector = [0.0] * dimension
        for word in words:
            for i, x in enumerate(_seeded_unit(word, dimension)):
                vector[i] += x
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def split_reply(text: str) -> list[str]:
    """Split a reply into stream pieces, one word (with its leading
    whitespace) each, like tokens: concatenating them gives ``text`` back."""
    return re.findall(r"\s*\S+|\s+", text)


# --------------------------------------------------------------------------
# Wire formatting helpers
# --------------------------------------------------------------------------


def _go_time(dt: datetime, nanos: int | None = None) -> str:
    """Format like Go's time.Time JSON (RFC3339Nano): the fraction has its
    trailing zeros trimmed and is absent when zero; UTC is written "Z"."""
    if nanos is None:
        nanos = dt.microsecond * 1000
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    offset = dt.utcoffset()
    if offset is None or offset == timedelta(0):
        zone = "Z"
    else:
        total_minutes = int(offset.total_seconds()) // 60
        sign = "+" if total_minutes >= 0 else "-"
        hours, minutes = divmod(abs(total_minutes), 60)
        zone = f"{sign}{hours:02d}:{minutes:02d}"
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone


def _now_go_time() -> str:
    # created_at is time.Now().UTC() in Ollama, with nanosecond precision.
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return _go_time(datetime.fromtimestamp(seconds, UTC), nanos)


def _go_quote(value: str) -> str:
    """Go's %q for the plain strings model names are."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(status: int, obj: Any) -> Response:
    return Response(_dumps(obj), status_code=status, media_type=JSON_MEDIA_TYPE)


def _error(status: int, message: str) -> Response:
    return _json_response(status, {"error": message})


def _not_found_error(name: str) -> Response:
    return _error(404, f"model {_go_quote(name)} not found, try pulling it first")


def _normalize_name(name: str) -> str:
    # Ollama resolves a name without a tag to ":latest".
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _parameter_count(parameter_size: str) -> int | None:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMBT]?)\s*", parameter_size, re.IGNORECASE)
    if match is None:
        return None
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2).upper()]
    return round(float(match.group(1)) * scale)


def _words(value: Any) -> int:
    return len(value.split()) if isinstance(value, str) else 0


def _timings(prompt_eval_count: int, eval_count: int) -> JSONObject:
    """Final-line metrics, omitting zero values like Go's omitempty does."""
    prompt_ns = prompt_eval_count * _PROMPT_EVAL_NS_PER_TOKEN
    eval_ns = eval_count * _EVAL_NS_PER_TOKEN
    metrics: JSONObject = {
        "total_duration": _LOAD_DURATION_NS + prompt_ns + eval_ns + _OVERHEAD_NS,
        "load_duration": _LOAD_DURATION_NS,
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }
    return {key: value for key, value in metrics.items() if value}


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _limit(pieces: list[str], options: JSONObject, done_reason: str) -> tuple[list[str], str]:
    """The reply as `options` cut it: at the first stop sequence (done_reason
    "stop") or after `num_predict` tokens (one piece is one token; "length")."""
    text, cut, limit = cut_reply("".join(pieces), options.get("stop"), options.get("num_predict"))
    pieces = split_reply(text)
    if limit is not None and limit < len(pieces):
        return pieces[:limit], "length"
    return pieces, "stop" if cut else done_reason


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "object"


# --------------------------------------------------------------------------
# /api/chat response, with disconnect detection
# --------------------------------------------------------------------------


@dataclass
class _ChatPlan:
    """Everything one /api/chat response will do, fixed when it arrives, so
    that reconfiguring a model mid-stream cannot tear a response."""

    model: str  # the name as requested: Ollama echoes it back
    stream: bool
    pieces: list[str]
    tool_calls: list[JSONObject]
    chunk_delay: float
    first_byte_delay: float
    error_after: int | None
    error_message: str
    status_error: tuple[int, str] | None
    endless: bool
    done_reason: str
    prompt_eval_count: int
    eval_count: int | None
    # "generate": /api/generate lines (text in `response`, `context` on the last).
    kind: Literal["chat", "generate"] = "chat"
    # The request's `logprobs` and `top_logprobs`: each content line then
    # carries `logprobs` for its piece (one token per piece).
    logprobs: bool = False
    top_logprobs: int = 0
    # /api/generate's last line (not in raw mode): the conversation as token ids.
    context: list[int] | None = None


def _token_entry(token: str, logprob: float) -> JSONObject:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(piece: str, position: int, top: int) -> list[JSONObject]:
    """Ollama's `logprobs` for one piece: the chosen token first among the alternatives."""
    chosen = _token_entry(piece, piece_logprob(position))
    alternatives = [chosen] + [
        _token_entry(f"alt{n}", piece_logprob(position) - n) for n in range(1, top)
    ]
    return [{**chosen, "top_logprobs": alternatives[:top]}]


class _Connection:
    """Per-response state shared by the writer and the disconnect watcher."""

    def __init__(self, send: Send) -> None:
        self._send = send
        # Set on client disconnect or server shutdown: the writer stops.
        self.stop = asyncio.Event()
        self.disconnected = False
        # Once the last body message is on its way, uvicorn's receive()
        # answers http.disconnect at once; that is not a client disconnect.
        self.finished = False
        self.started = False

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if the response must stop."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)
        else:
            # Yield anyway, so the watcher can see a disconnect between lines.
            await asyncio.sleep(0)
        return self.stop.is_set()

    async def start(self, status: int, media_type: str) -> None:
        self.started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", media_type.encode("latin-1"))],
            }
        )

    async def line(self, obj: JSONObject) -> None:
        await self._send(
            {"type": "http.response.body", "body": _dumps(obj) + b"\n", "more_body": True}
        )

    async def finish(self, body: bytes = b"") -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def respond(self, status: int, obj: JSONObject) -> None:
        """A whole non-streamed JSON response."""
        body = _dumps(obj)
        self.started = True
        self.finished = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", JSON_MEDIA_TYPE.encode("latin-1")),
                    (b"content-length", str(len(body)).encode("latin-1")),
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


class _ChatResponse(Response):
    """An ASGI response that writes a scripted chat answer while a watcher
    task listens for ``http.disconnect``. Starlette's StreamingResponse would
    cancel the writer on disconnect instead, which leaves no reliable place
    to count the disconnect and the open streams."""

    def __init__(self, fake: FakeOllama, plan: _ChatPlan) -> None:
        super().__init__(status_code=200, media_type=NDJSON_MEDIA_TYPE)
        self._fake = fake
        self._plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        conn = _Connection(send)
        watcher = asyncio.create_task(self._watch(receive, conn))
        self._fake._response_opened(conn, streaming=self._plan.stream)
        try:
            if self._plan.stream:
                await self._stream(conn)
            else:
                await self._whole(conn)
        finally:
            if not conn.disconnected and not conn.finished:
                # Stopped by server shutdown: end the response properly.
                with contextlib.suppress(Exception):
                    if conn.started:
                        await conn.finish()
                    else:
                        await conn.respond(503, {"error": "server shutting down"})
            conn.finished = True
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._fake._response_closed(conn, streaming=self._plan.stream)

    @staticmethod
    async def _watch(receive: Receive, conn: _Connection) -> None:
        # The request body has been read already, so the next message is
        # http.disconnect: uvicorn sends it when the TCP connection is lost.
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                if not conn.finished:
                    conn.disconnected = True
                    conn.stop.set()
                return

    def _metrics(self, lines: int) -> JSONObject:
        plan = self._plan
        eval_count = plan.eval_count
        if eval_count is None:
            eval_count = lines + len(plan.tool_calls)
        return _timings(plan.prompt_eval_count, eval_count)

    def _pieces(self) -> Iterator[str]:
        if not self._plan.endless:
            yield from self._plan.pieces
            return
        pieces = self._plan.pieces or [" tick"]
        while True:
            yield from pieces

    async def _stream(self, conn: _Connection) -> None:
        plan = self._plan
        if await conn.pause(plan.first_byte_delay):
            return
        if plan.status_error is not None:
            await conn.respond(plan.status_error[0], {"error": plan.status_error[1]})
            return
        await conn.start(200, NDJSON_MEDIA_TYPE)
        delay = plan.chunk_delay
        if plan.endless and delay <= 0:
            delay = _ENDLESS_DEFAULT_DELAY
        lines = 0
        for piece in self._pieces():
            if plan.error_after is not None and lines >= plan.error_after:
                break
            if lines and await conn.pause(delay):
                return
            await conn.line(self._content_line(piece, lines))
            lines += 1
        if plan.error_after is not None:
            # Ollama's mid-stream failure: an error line, status still 200.
            if lines and await conn.pause(delay):
                return
            await conn.finish(_dumps({"error": plan.error_message}) + b"\n")
            return
        if plan.tool_calls:
            if lines and await conn.pause(delay):
                return
            await conn.line(
                self._chunk(
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": copy.deepcopy(plan.tool_calls),
                    }
                )
            )
        if (lines or plan.tool_calls) and await conn.pause(delay):
            return
        await conn.finish(_dumps(self._final("", lines)) + b"\n")

    async def _whole(self, conn: _Connection) -> None:
        plan = self._plan
        if await conn.pause(plan.first_byte_delay):
            return
        if plan.status_error is not None:
            await conn.respond(plan.status_error[0], {"error": plan.status_error[1]})
            return
        if plan.endless:
            # A server that never answers: wait for the client to give up.
            await conn.stop.wait()
            return
        if plan.error_after is not None:
            await conn.respond(500, {"error": plan.error_message})
            return
        await conn.respond(200, self._final("".join(plan.pieces), len(plan.pieces)))

    def _final(self, text: str, lines: int) -> JSONObject:
        """The last line (or the whole non-streamed answer) with `text` as its content."""
        plan = self._plan
        final: JSONObject = {"model": plan.model, "created_at": _now_go_time()}
        if plan.kind == "generate":
            final["response"] = text
        else:
            message: JSONObject = {"role": "assistant", "content": text}
            if plan.tool_calls and not plan.stream:
                message["tool_calls"] = copy.deepcopy(plan.tool_calls)
            final["message"] = message
        final["done"] = True
        final["done_reason"] = plan.done_reason
        if plan.kind == "generate" and plan.context is not None:
            final["context"] = plan.context
        final.update(self._metrics(lines))
        if plan.logprobs and not plan.stream and text:
            final["logprobs"] = [
                entry
                for position, piece in enumerate(plan.pieces)
                for entry in _logprobs(piece, position, plan.top_logprobs)
            ]
        return final

    def _content_line(self, piece: str, position: int) -> JSONObject:
        """One streamed line carrying `piece` (and its logprobs when asked)."""
        if self._plan.kind == "generate":
            line: JSONObject = {
                "model": self._plan.model,
                "created_at": _now_go_time(),
                "response": piece,
                "done": False,
            }
        else:
            line = self._chunk({"role": "assistant", "content": piece})
        if self._plan.logprobs:
            line["logprobs"] = _logprobs(piece, position, self._plan.top_logprobs)
        return line

    def _chunk(self, message: JSONObject) -> JSONObject:
        return {
            "model": self._plan.model,
            "created_at": _now_go_time(),
            "message": message,
            "done": False,
        }


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class FakeOllama:
    """A fake Ollama HTTP server on 127.0.0.1, in a background thread.

    ``FakeOllama(models=None, *, host="127.0.0.1", port=0, version="0.12.6")``;
    ``models=None`` means :func:`default_models`. Use ``start()``/``stop()``
    or ``with FakeOllama() as fake:``; then ``fake.base_url``.

    All public methods are thread-safe and may be called from any thread,
    including from inside an async test (they never touch its loop).
    """

    def __init__(
        self,
        models: Iterable[FakeModel] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = "0.12.6",
    ) -> None:
        self.version = version
        self._host = host
        self._requested_port = port
        self._initial_models = [
            copy.deepcopy(m) for m in (default_models() if models is None else models)
        ]
        self._lock = threading.Lock()
        # Notified whenever a response opens or closes, for the wait_* methods.
        self._changed = threading.Condition(self._lock)
        self._models: dict[str, FakeModel] = {}
        self._requests: list[RecordedRequest] = []
        self._loaded: dict[str, float] = {}
        self._disconnects = 0
        self._active_streams = 0
        self._set_models(self._initial_models)

        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_error: BaseException | None = None
        # Only touched on the server's loop: open chat responses.
        self._connections: set[_Connection] = set()
        self._port: int | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> FakeOllama:
        """Start serving; returns once the port accepts and serves requests."""
        if self._thread is not None:
            raise RuntimeError("FakeOllama is already started")
        # Bind before the thread starts: the port is known at once and a
        # connection attempt never races the server's startup.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Served through `sockets=`, accepted connections get no TCP_NODELAY
        # from asyncio; Linux copies it from the listener. Without it every
        # keep-alive response stalls ~40 ms on Nagle + delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self._host, self._requested_port))
        sock.listen(128)
        self._socket = sock
        self._port = sock.getsockname()[1]

        config = uvicorn.Config(
            self._build_app(),
            http="httptools",
            ws="none",
            lifespan="off",
            # No dictConfig and no level changes: leave the test's logging
            # alone; uvicorn's errors still reach the root logger.
            log_config=None,
            log_level=None,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread_error = None
        self._thread = threading.Thread(
            target=self._run, name=f"fake-ollama-{self._port}", daemon=True
        )
        self._thread.start()

        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self._cleanup_after_thread()
                raise RuntimeError("FakeOllama failed to start") from self._thread_error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("FakeOllama did not start in time")
            time.sleep(0.001)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: open streams end, then the thread exits. Idempotent."""
        thread, server, loop = self._thread, self._server, self._loop
        if thread is None or server is None:
            return
        if loop is not None and not loop.is_closed():
            # uvicorn waits for running responses; end endless ones first.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._abort_connections)
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._cleanup_after_thread()

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOllama is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            asyncio.run(self._serve(self._server, self._socket))
        except BaseException as exc:  # reported by start()
            self._thread_error = exc

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        await server.serve(sockets=[sock])

    def _abort_connections(self) -> None:
        for conn in self._connections:
            conn.stop.set()

    def _cleanup_after_thread(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._server = None
        self._thread = None
        self._loop = None

    # ------------------------------------------------------------- models

    def _set_models(self, models: Iterable[FakeModel]) -> None:
        self._models = {}
        for model in models:
            self._models[_normalize_name(model.name)] = model

    def add_model(self, model: FakeModel) -> FakeModel:
        """Add (or replace) a model; returns it for direct mutation."""
        with self._lock:
            self._models[_normalize_name(model.name)] = model
        return model

    def remove_model(self, name: str) -> None:
        with self._lock:
            del self._models[_normalize_name(name)]

    def set_model(self, name: str, **changes: Any) -> FakeModel:
        """Change fields of a model, e.g. ``set_model("llama3.2", reply="Hi")``.
        Requests already running keep the configuration they started with."""
        key = _normalize_name(name)
        with self._lock:
            if key not in self._models:
                raise KeyError(name)
            model = dataclasses.replace(self._models[key], **changes)
            del self._models[key]
            self._models[_normalize_name(model.name)] = model
        return model

    def get_model(self, name: str) -> FakeModel:
        """The live model object (mutating it is seen by later requests)."""
        with self._lock:
            return self._models[_normalize_name(name)]

    @property
    def models(self) -> list[FakeModel]:
        with self._lock:
            return list(self._models.values())

    def _lookup(self, name: str) -> FakeModel | None:
        with self._lock:
            model = self._models.get(_normalize_name(name))
            # A shallow copy: a request sees one consistent configuration.
            return None if model is None else dataclasses.replace(model)

    # ------------------------------------------------------- observability

    def reset(self, *, models: bool = False) -> None:
        """Forget recorded requests, disconnects and loaded models. With
        ``models=True`` also restore the models given to the constructor."""
        with self._lock:
            self._requests.clear()
            self._disconnects = 0
            self._loaded.clear()
            if models:
                self._set_models(copy.deepcopy(m) for m in self._initial_models)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if r.path == path]

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return self.requests_to("/api/chat")

    @property
    def generate_requests(self) -> list[RecordedRequest]:
        return self.requests_to("/api/generate")

    @property
    def embed_requests(self) -> list[RecordedRequest]:
        return self.requests_to("/api/embed")

    @property
    def disconnects(self) -> int:
        """Chat responses whose client went away before they were complete."""
        with self._lock:
            return self._disconnects

    @property
    def active_streams(self) -> int:
        """Streaming chat responses currently open."""
        with self._lock:
            return self._active_streams

    def wait_for_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        """Block until ``disconnects >= count``; False on timeout. From an
        async test use :meth:`wait_for_disconnect_async`: this one blocks
        the calling thread, and so the test's loop (the fake keeps working,
        but a client on that loop cannot make progress meanwhile)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._disconnects >= count, timeout)

    async def wait_for_disconnect_async(self, timeout: float = 5.0, count: int = 1) -> bool:
        return await self._poll(lambda: self.disconnects >= count, timeout)

    def wait_for_active_streams(self, count: int, timeout: float = 5.0) -> bool:
        """Block until exactly ``count`` chat streams are open."""
        with self._changed:
            return self._changed.wait_for(lambda: self._active_streams == count, timeout)

    async def wait_for_active_streams_async(self, count: int, timeout: float = 5.0) -> bool:
        return await self._poll(lambda: self.active_streams == count, timeout)

    @staticmethod
    async def _poll(condition: Callable[[], bool], timeout: float) -> bool:
        # Polling keeps the caller's loop free without a helper thread.
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _response_opened(self, conn: _Connection, *, streaming: bool) -> None:
        self._connections.add(conn)
        with self._changed:
            if streaming:
                self._active_streams += 1
            self._changed.notify_all()

    def _response_closed(self, conn: _Connection, *, streaming: bool) -> None:
        self._connections.discard(conn)
        # One critical section: once a waiter sees the disconnect, the
        # stream is no longer counted as active.
        with self._changed:
            if streaming:
                self._active_streams -= 1
            if conn.disconnected:
                self._disconnects += 1
            self._changed.notify_all()

    def _mark_loaded(self, name: str) -> None:
        with self._lock:
            self._loaded[_normalize_name(name)] = time.time()

    # ------------------------------------------------------------ the app

    def _build_app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            # Gin answers unknown routes and wrong methods alike with this.
            await self._record(request)
            return Response("404 page not found", 404, media_type="text/plain")

        return Starlette(
            routes=[
                Route("/", self._root, methods=["GET"]),
                Route("/api/version", self._version, methods=["GET"]),
                Route("/api/tags", self._tags, methods=["GET"]),
                Route("/api/ps", self._ps, methods=["GET"]),
                Route("/api/show", self._show, methods=["POST"]),
                Route("/api/chat", self._chat, methods=["POST"]),
                Route("/api/generate", self._generate, methods=["POST"]),
                Route("/api/embed", self._embed, methods=["POST"]),
            ],
            exception_handlers={404: not_found, 405: not_found},
        )

    async def _record(self, request: Request) -> tuple[bytes, Any, str | None]:
        """Record the request; returns (raw body, parsed JSON, parse error)."""
        raw = await request.body()
        parsed: Any = None
        error: str | None = None
        if not raw.strip():
            error = "missing request body"
        else:
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                error = f"invalid character in request body: {exc}"
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers=headers,
            body=parsed,
            raw_body=raw,
        )
        with self._lock:
            self._requests.append(record)
        return raw, parsed, error

    async def _read_object(self, request: Request, go_type: str) -> JSONObject | Response:
        """The JSON object body, or the 400 Ollama would answer."""
        _, parsed, error = await self._record(request)
        if error is not None:
            return _error(400, error)
        if not isinstance(parsed, dict):
            kind = _json_kind(parsed)
            return _error(400, f"json: cannot unmarshal {kind} into Go value of type {go_type}")
        return parsed

    async def _root(self, request: Request) -> Response:
        await self._record(request)
        return Response("Ollama is running", media_type="text/plain")

    async def _version(self, request: Request) -> Response:
        await self._record(request)
        return _json_response(200, {"version": self.version})

    async def _tags(self, request: Request) -> Response:
        await self._record(request)
        entries = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": _go_time(m.modified_at),
                "size": m.size,
                "digest": m.resolved_digest(),
                "details": m.details(),
            }
            for m in self.models
        ]
        return _json_response(200, {"models": entries})

    async def _ps(self, request: Request) -> Response:
        await self._record(request)
        with self._lock:
            loaded = [(self._models.get(n), t) for n, t in self._loaded.items()]
        entries = []
        for model, loaded_at in loaded:
            if model is None:
                continue
            # Ollama keeps a model loaded for 5 minutes by default.
            expires = datetime.fromtimestamp(loaded_at).astimezone() + timedelta(minutes=5)
            entries.append(
                {
                    "name": model.name,
                    "model": model.name,
                    "size": model.size,
                    "digest": model.resolved_digest(),
                    "details": model.details(),
                    "expires_at": _go_time(expires),
                    "size_vram": model.size,
                    "context_length": min(model.context_length, 4096),
                }
            )
        return _json_response(200, {"models": entries})

    async def _show(self, request: Request) -> Response:
        body = await self._read_object(request, "api.ShowRequest")
        if isinstance(body, Response):
            return body
        # "name" is the deprecated spelling Ollama still accepts.
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return _not_found_error(name)
        if model.show_error is not None:
            return _error(*model.show_error)
        arch = model.architecture or model.family
        model_info: JSONObject = {"general.architecture": arch}
        parameter_count = _parameter_count(model.parameter_size)
        if parameter_count is not None:
            model_info["general.parameter_count"] = parameter_count
        model_info[f"{arch}.context_length"] = model.context_length
        model_info[f"{arch}.embedding_length"] = model.embedding_dimension
        response: JSONObject = {
            "license": model.license,
            "modelfile": model.modelfile or self._modelfile(model),
            "parameters": model.parameters,
            "template": model.template,
            "details": model.details(),
            "model_info": model_info,
            "capabilities": list(model.capabilities),
            "modified_at": _go_time(model.modified_at),
        }
        # ShowResponse's string fields are omitempty in Ollama.
        for key in ("license", "parameters", "template"):
            if not response[key]:
                del response[key]
        return _json_response(200, response)

    @staticmethod
    def _modelfile(model: FakeModel) -> str:
        lines = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {model.name}",
            "",
            f"FROM /root/.ollama/models/blobs/sha256-{model.resolved_digest()}",
            f'TEMPLATE """{model.template}"""',
        ]
        for parameter in model.parameters.splitlines():
            key, _, value = parameter.partition(" ")
            lines.append(f"PARAMETER {key} {value.strip()}")
        return "\n".join(lines) + "\n"

    async def _chat(self, request: Request) -> Response:
        body = await self._read_object(request, "api.ChatRequest")
        if isinstance(body, Response):
            return body
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        messages = body.get("messages")
        if messages is None:
            messages = []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            kind = _json_kind(messages)
            return _error(
                400,
                f"json: cannot unmarshal {kind} into Go struct field "
                "ChatRequest.messages of type []api.Message",
            )
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return _error(
                400,
                f"json: cannot unmarshal {_json_kind(stream)} into Go struct field "
                "ChatRequest.stream of type bool",
            )
        model = self._lookup(name)
        if model is None:
            return _not_found_error(name)
        if model.status_error is None:
            if "completion" not in model.capabilities:
                return _error(400, f"{_go_quote(name)} does not support chat")
            if body.get("tools") and "tools" not in model.capabilities:
                return _error(
                    400, f"registry.ollama.ai/library/{model.name} does not support tools"
                )
        if model.status_error is None:
            self._mark_loaded(model.name)
        if not messages and model.status_error is None:
            # Ollama answers an empty conversation by loading the model.
            return _json_response(
                200,
                {
                    "model": name,
                    "created_at": _now_go_time(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                },
            )
        plan = self._plan(
            model, name, messages, stream is not False, body.get("format"), bool(body.get("tools"))
        )
        plan.logprobs = body.get("logprobs") is True
        plan.top_logprobs = _int_or(body.get("top_logprobs"), 0)
        return _ChatResponse(self, plan)

    async def _model_request(
        self, request: Request, go_type: str
    ) -> tuple[JSONObject, str, FakeModel] | Response:
        """The body, the model name as requested and the model; or the error Ollama answers."""
        body = await self._read_object(request, go_type)
        if isinstance(body, Response):
            return body
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return _not_found_error(name)
        return body, name, model

    async def _generate(self, request: Request) -> Response:
        found = await self._model_request(request, "api.GenerateRequest")
        if isinstance(found, Response):
            return found
        body, name, model = found
        prompt = body.get("prompt")
        prompt = prompt if isinstance(prompt, str) else ""
        if model.status_error is None:
            if "completion" not in model.capabilities:
                return _error(400, f"{_go_quote(name)} does not support generate")
            if body.get("suffix") and "insert" not in model.capabilities:
                return _error(
                    400, f"registry.ollama.ai/library/{model.name} does not support insert"
                )
            self._mark_loaded(model.name)
        if not prompt and model.status_error is None:
            # An empty prompt only loads the model, as for chat.
            return _json_response(
                200,
                {
                    "model": name,
                    "created_at": _now_go_time(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                },
            )
        stream = body.get("stream") is not False
        plan = self._plan(model, name, [{"role": "user", "content": prompt}], stream)
        options = body.get("options")
        pieces, done_reason = _limit(
            plan.pieces, options if isinstance(options, dict) else {}, plan.done_reason
        )
        raw = body.get("raw") is True
        return _ChatResponse(
            self,
            dataclasses.replace(
                plan,
                kind="generate",
                pieces=pieces,
                tool_calls=[],
                done_reason=done_reason,
                logprobs=body.get("logprobs") is True,
                top_logprobs=_int_or(body.get("top_logprobs"), 0),
                # Raw mode keeps no conversation, so it returns no context.
                context=None if raw else list(range(1, plan.prompt_eval_count + len(pieces) + 1)),
            ),
        )

    @staticmethod
    def _plan(
        model: FakeModel,
        requested: str,
        messages: list[JSONObject],
        stream: bool,
        response_format: Any = None,
        offers_tools: bool = False,
    ) -> _ChatPlan:
        last = messages[-1] if messages else {}
        after_tool_result = last.get("role") == "tool"
        tool_calls = model.tool_calls
        if after_tool_result and not model.tool_calls_after_tool_result:
            tool_calls = []
        if offers_tools and model.tool_call_turns:
            tool_calls = model.tool_call_turns.pop(0)
        reply = model.reply
        if model.replies:
            reply = model.replies.pop(0)
        elif reply is None and isinstance(response_format, dict) and not tool_calls:
            # A schema in `format`: answer JSON that follows it, as a real model does.
            reply = json.dumps(structured_answer(response_format, messages))
        if reply is None:
            if tool_calls:
                reply = ""
            else:
                said = last.get("content")
                said = said if isinstance(said, str) else ""
                reply = f"Hello from {model.name}! You said: {said}"
        prompt_eval_count = model.prompt_eval_count
        if prompt_eval_count is None:
            prompt_eval_count = sum(_words(m.get("content")) for m in messages)
        return _ChatPlan(
            model=requested,
            stream=stream,
            pieces=split_reply(reply),
            tool_calls=copy.deepcopy(tool_calls),
            chunk_delay=model.chunk_delay,
            first_byte_delay=model.first_byte_delay,
            error_after=model.error_after,
            error_message=model.error_message,
            status_error=model.status_error,
            endless=model.endless,
            done_reason=model.done_reason,
            prompt_eval_count=prompt_eval_count,
            eval_count=model.eval_count,
        )

    async def _embed(self, request: Request) -> Response:
        found = await self._model_request(request, "api.EmbedRequest")
        if isinstance(found, Response):
            return found
        body, name, model = found
        if model.first_byte_delay > 0:
            await asyncio.sleep(model.first_byte_delay)
        if model.status_error is not None:
            return _error(*model.status_error)
        raw_input = body.get("input")
        texts: list[str]
        if raw_input is None or raw_input == "":
            texts = []
        elif isinstance(raw_input, str):
            texts = [raw_input]
        elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
            texts = list(raw_input)
        else:
            return _error(400, "invalid input type")
        too_long = [
            len(t) for t in texts if model.max_input_chars and len(t) > model.max_input_chars
        ]
        if too_long:
            return _error(
                500,
                f"input ({too_long[0]} tokens) is too large to process. increase the physical "
                f"batch size (current batch size: {model.max_input_chars})",
            )
        dimension = model.embedding_dimension
        requested_dimensions = body.get("dimensions")
        if isinstance(requested_dimensions, int) and 0 < requested_dimensions < dimension:
            dimension = requested_dimensions
        self._mark_loaded(model.name)
        prompt_eval_count = sum(_words(t) for t in texts)
        response: JSONObject = {
            "model": name,
            "embeddings": [fake_embedding(t, dimension) for t in texts],
            **{
                k: v
                for k, v in _timings(prompt_eval_count, 0).items()
                if k in ("total_duration", "load_duration", "prompt_eval_count")
            },
        }
        return _json_response(200, response)
