"""Token log probabilities as upstreams report them, turned into TokenLogprob messages."""

from __future__ import annotations

from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import UpstreamProtocolError

# OpenAI's stand-in for a token too unlikely to have a number.
VERY_UNLIKELY = -9999.0


def _token_bytes(value: Any) -> bytes:
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    return b""


def _logprob(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # Some servers send null for a token outside what they kept: OpenAI's "very unlikely".
    return VERY_UNLIKELY


def token_logprob(entry: Any) -> pb.TokenLogprob:
    """One `{token, logprob, bytes, top_logprobs}` entry (OpenAI chat's and Ollama's shape)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise UpstreamProtocolError("a logprobs entry has no token")
    out = pb.TokenLogprob(
        token=entry["token"],
        logprob=_logprob(entry.get("logprob")),
        bytes=_token_bytes(entry.get("bytes")),
    )
    top = entry.get("top_logprobs")
    for alternative in top if isinstance(top, list) else ():
        if isinstance(alternative, dict) and isinstance(alternative.get("token"), str):
            out.top_logprobs.add(
                token=alternative["token"],
                logprob=_logprob(alternative.get("logprob")),
                bytes=_token_bytes(alternative.get("bytes")),
            )
    return out


def chat_logprobs(value: Any) -> list[pb.TokenLogprob]:
    """A chat choice's `logprobs` (`{"content": [...]}`) as TokenLogprobs."""
    content = value.get("content") if isinstance(value, dict) else None
    return [token_logprob(e) for e in content] if isinstance(content, list) else []


def text_logprobs(value: Any) -> list[pb.TokenLogprob]:
    """A text completion choice's `logprobs` (parallel lists `tokens`,
    `token_logprobs`, `top_logprobs` of `{token: logprob}`) as TokenLogprobs.

    llama.cpp's server answers `/completions` in chat's shape instead
    (`{"content": [{token, logprob, bytes, top_logprobs}]}`): read as such."""
    if isinstance(value, dict) and isinstance(value.get("content"), list):
        return chat_logprobs(value)
    if not isinstance(value, dict) or not isinstance(value.get("tokens"), list):
        return []
    values = value.get("token_logprobs")
    tops = value.get("top_logprobs")
    out = []
    for index, token in enumerate(value["tokens"]):
        entry = pb.TokenLogprob(token=str(token))
        if isinstance(values, list) and index < len(values):
            entry.logprob = _logprob(values[index])
        top = tops[index] if isinstance(tops, list) and index < len(tops) else None
        for alternative, logprob in top.items() if isinstance(top, dict) else ():
            entry.top_logprobs.add(token=str(alternative), logprob=_logprob(logprob))
        out.append(entry)
    return out
