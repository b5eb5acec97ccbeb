"""OpenAI's Responses API end to end with the official Python SDK: SDK →
gateway → auth + providers (+ memory for stored responses) → fake Ollama,
every service a real process. What the fake upstream received is checked, so
continuations are seen to carry the earlier turns."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, SecretStr

from tests.fakes import FakeModel, FakeOllama
from tests.stack import Stack, free_ports, start_stack

MODEL = "ollama/llama3.2:latest"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
CUT_SHORT = FakeModel(name="cutshort:latest", reply="one two three", done_reason="length")
TWO_CALLS = FakeModel(
    name="twocalls:latest",
    capabilities=["completion", "tools"],
    tool_calls=[
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ],
)


@pytest.fixture(scope="module", autouse=True)
def models(ollama: FakeOllama) -> Iterator[None]:
    for model in (CUT_SHORT, TWO_CALLS):
        ollama.add_model(model)
    yield
    for model in (CUT_SHORT, TWO_CALLS):
        ollama.remove_model(model.name)


@pytest.fixture
def client(stack: Stack, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0) as c:
        yield c


def last_messages(ollama: FakeOllama) -> list[dict[str, Any]]:
    body = ollama.chat_requests[-1].body
    assert body is not None
    messages: list[dict[str, Any]] = body["messages"]
    return messages


def test_create_answers_a_response_object(client: openai.OpenAI, ollama: FakeOllama) -> None:
    ollama.reset()
    response = client.responses.create(
        model=MODEL,
        input="hi there",
        instructions="Be brief.",
        temperature=0.3,
        max_output_tokens=50,
        metadata={"app": "tests"},
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == MODEL
    assert response.output_text == "Hello from llama3.2:latest! You said: hi there"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "completed"
    assert response.usage is not None
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens
    )
    assert response.instructions == "Be brief."
    assert response.metadata == {"app": "tests"}
    assert response.incomplete_details is None and response.error is None
    body = ollama.chat_requests[-1].body
    assert body is not None
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
    ]
    assert body["options"]["temperature"] == pytest.approx(0.3)
    assert body["options"]["num_predict"] == 50


@pytest.mark.usefixtures("paced_llama")
def test_stream_events_come_in_order_and_the_sdk_assembles_the_text(
    client: openai.OpenAI,
) -> None:
    with client.responses.stream(model=MODEL, input="hi there") as stream:
        events: list[Any] = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1  # streamed, not one piece
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hello from llama3.2:latest! You said: hi there"
    assert final.status == "completed" and final.usage is not None
    lifecycle = ("response.created", "response.in_progress", "response.completed")
    assert all(e.response.id == final.id for e in events if e.type in lifecycle)


def test_a_function_call_round_trip_continues_the_response(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    first = client.responses.create(
        model="ollama/tooly:latest", input="Weather in Paris?", tools=TOOLS
    )
    (call,) = first.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id
    assert ollama.chat_requests[-1].body["tools"][0]["function"]["name"] == "get_weather"

    second = client.responses.create(
        model="ollama/tooly:latest",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=TOOLS,
    )
    assert second.output_text  # the model answers the tool result in text
    assert second.previous_response_id == first.id
    assert last_messages(ollama) == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
    ]


def test_streamed_function_calls_use_the_arguments_events(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="ollama/tooly:latest", input="Weather in Paris?", tools=TOOLS
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.completed")
    (call,) = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


def test_parallel_tool_calls_false_keeps_the_first_call(client: openai.OpenAI) -> None:
    both = client.responses.create(model="ollama/twocalls:latest", input="x", tools=TOOLS)
    assert [o.type for o in both.output] == ["function_call", "function_call"]
    one = client.responses.create(
        model="ollama/twocalls:latest", input="x", tools=TOOLS, parallel_tool_calls=False
    )
    (call,) = one.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    assert one.parallel_tool_calls is False


class Count(BaseModel):
    n: int
    label: str


def test_parse_with_a_json_schema_format(client: openai.OpenAI, ollama: FakeOllama) -> None:
    ollama.reset()
    parsed = client.responses.parse(model=MODEL, input="count", text_format=Count)
    assert parsed.output_parsed == Count(n=0, label="")
    body = ollama.chat_requests[-1].body
    assert body is not None
    assert body["format"]["properties"]["n"]["type"] == "integer"
    assert parsed.text is not None and parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"

    client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_object"}})
    assert ollama.chat_requests[-1].body["format"] == "json"


def test_previous_response_id_sends_the_earlier_turns(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    ollama.reset()
    first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="Old.")
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input="What is my name?"
    )
    third = client.responses.create(
        model=MODEL,
        previous_response_id=second.id,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Again?"}]}],
        instructions="New.",
    )
    assert third.status == "completed"
    # Earlier instructions are not carried over (as OpenAI); the turns are.
    assert last_messages(ollama) == [
        {"role": "system", "content": "New."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Again?"},
    ]


def test_a_streamed_response_is_stored_before_it_completes(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="first") as stream:
        final = stream.get_final_response()
    again = client.responses.retrieve(final.id)
    assert again.output_text == final.output_text
    follow = client.responses.create(model=MODEL, previous_response_id=final.id, input="next")
    assert follow.status == "completed"


def test_retrieve_list_input_items_and_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
    )
    got = client.responses.retrieve(response.id)
    assert got.id == response.id and got.output_text == response.output_text
    assert got.usage == response.usage

    items: Any = client.responses.input_items.list(response.id)
    texts = [i.content[0].text for i in items.data]
    assert texts == ["three", "two", "one"]  # newest first, as OpenAI
    assert [i.role for i in items.data] == ["user", "assistant", "user"]
    assert all(i.id for i in items.data)
    page: Any = client.responses.input_items.list(response.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["one", "two"]
    assert page.has_more is True
    rest: Any = client.responses.input_items.list(response.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["three"]
    assert rest.has_more is False

    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_another_tenants_key_gets_404(client: openai.OpenAI, stack: Stack, api_key: str) -> None:
    response = client.responses.create(model=MODEL, input="secret")
    other_key = stack.create_key("other-tenant", "--owner", "someone-else")
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other_key, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.input_items.list(response.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError) as refused:
            other.responses.create(model=MODEL, input="x", previous_response_id=response.id)
        assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_stored_responses_stay_out_of_the_tenants_conversations(
    client: openai.OpenAI, stack: Stack, api_key: str
) -> None:
    response = client.responses.create(model=MODEL, input="kept apart")
    headers = {"Authorization": f"Bearer {api_key}"}
    listed = httpx.get(
        f"{stack.base_url}/api/conversations", headers=headers, params={"limit": 100}
    )
    assert listed.status_code == 200
    ids = [c["id"] for c in listed.json()["data"]]
    assert response.id.removeprefix("resp_") not in ids
    found = httpx.get(f"{stack.base_url}/api/search", headers=headers, params={"q": "kept apart"})
    assert found.status_code == 200
    assert found.json()["data"] == []
    # The reserved end user holding them cannot be named over REST.
    reserved = httpx.get(
        f"{stack.base_url}/api/conversations", headers=headers, params={"user": "marie:responses"}
    )
    assert reserved.status_code == 400
    assert reserved.json()["error"]["param"] == "user"
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="hi", store=False)
    assert response.status == "completed"
    assert response.to_dict()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_max_output_tokens_reached_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="ollama/cutshort:latest", input="x")
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(model="ollama/cutshort:latest", input="x", stream=True))
    assert events[-1].type == "response.incomplete"


def test_a_failure_mid_stream_ends_with_response_failed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="ollama/broken:latest", input="x", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "server_error"
    stored = client.responses.retrieve(failed.response.id)
    assert stored.status == "failed"


def test_an_unknown_model_is_a_plain_404_before_any_event(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="ollama/nope:latest", input="x", stream=True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].file_id",
        ),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"input": "x", "max_output_tokens": 2**31}, "max_output_tokens"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
        ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"input": 5}, "input"),
    ],
)
def test_bad_requests_name_the_field(
    stack: Stack, api_key: str, body: dict[str, Any], param: str
) -> None:
    reply = httpx.post(
        f"{stack.base_url}/v1/responses",
        json={"model": MODEL, **body},
        headers={"authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    assert reply.status_code in (400, 404), reply.text
    assert reply.json()["error"]["param"] == param, reply.text


def test_input_items_refuses_a_bad_limit(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.input_items.list(response.id, limit=500)
    assert refused.value.body["param"] == "limit"  # type: ignore[index]


@pytest.fixture(scope="module")
def memoryless(ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A suite whose gateway reaches no memory service (its address is a
    port nothing listens on)."""
    (nowhere,) = free_ports(1)
    running = start_stack(
        tmp_path_factory.mktemp("memoryless"),
        ollama.base_url,
        MARIE_GATEWAY_MEMORY_ADDR=f"127.0.0.1:{nowhere}",
    )
    yield running
    running.stop()


def test_without_the_memory_service_store_false_works_and_store_true_is_503(
    memoryless: Stack, tmp_path: Path
) -> None:
    key = memoryless.create_key("no-memory")
    with openai.OpenAI(base_url=f"{memoryless.base_url}/v1", api_key=key, max_retries=0) as client:
        plain = client.responses.create(model=MODEL, input="hi", store=False)
        assert plain.output_text == "Hello from llama3.2:latest! You said: hi"
        with client.responses.stream(model=MODEL, input="hi", store=False) as stream:
            assert stream.get_final_response().output_text == plain.output_text
        with pytest.raises(openai.InternalServerError) as refused:
            client.responses.create(model=MODEL, input="hi")
        assert refused.value.status_code == 503
        assert "store: false" in refused.value.message


@pytest.mark.usefixtures("paced_llama")
def test_langchain_chat_openai_on_the_responses_api(
    stack: Stack, api_key: str, ollama: FakeOllama
) -> None:
    from langchain_openai import ChatOpenAI  # noqa: PLC0415

    ollama.reset()
    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{stack.base_url}/v1",
        api_key=SecretStr(api_key),
        use_responses_api=True,
        max_retries=0,
    )
    answer = llm.invoke("hi there")
    assert answer.text == "Hello from llama3.2:latest! You said: hi there"
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0
    assert str(answer.response_metadata["id"]).startswith("resp_")
    # Its own answer sent back as history, in the shape LangChain sends it.
    again = llm.invoke([("human", "hi there"), answer, ("human", "and again")])
    assert again.text == "Hello from llama3.2:latest! You said: and again"
    assert last_messages(ollama)[1] == {"role": "assistant", "content": answer.text}

    pieces = list(llm.stream("stream please"))
    assert len([p for p in pieces if p.text]) > 1  # it streamed
    assert "".join(p.text for p in pieces) == "Hello from llama3.2:latest! You said: stream please"
    assert last_messages(ollama) == [{"role": "user", "content": "stream please"}]
    assert ollama.chat_requests[-1].body["stream"] is True


def test_a_client_leaving_a_stream_stops_the_upstream_and_keeps_it_cancelled(
    client: openai.OpenAI, ollama: FakeOllama
) -> None:
    before = ollama.disconnects
    stream = client.responses.create(model="ollama/endless:latest", input="go", stream=True)
    events = iter(stream)
    created: Any = next(events)
    for _ in range(5):
        next(events)
    stream.close()
    assert ollama.wait_for_disconnect(timeout=10, count=before + 1)
    assert ollama.wait_for_active_streams(0, timeout=10)
    deadline = time.monotonic() + 10
    while True:  # kept after the client left, in the background
        try:
            kept = client.responses.retrieve(created.response.id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert kept.status == "cancelled"
    assert kept.output_text  # what was said before the client left


def test_usage_and_limits_hold_as_for_chat(stack: Stack) -> None:
    key = stack.create_key("responses-limited", "--owner", "responses-usage", "--rpm", "2")
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0) as limited:
        answered = [limited.responses.create(model=MODEL, input="a", store=False)]
        answered.append(limited.responses.create(model=MODEL, input="b", store=False))
        with pytest.raises(openai.RateLimitError):
            limited.responses.create(model=MODEL, input="c", store=False)
    expected = sum(r.usage.total_tokens for r in answered if r.usage is not None)
    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(
            f"{stack.base_url}/api/usage",
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        ).json()
        if report["total"]["requests"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert report["total"]["requests"] == 2
    assert report["total"]["total_tokens"] == expected


def test_image_input_reaches_ollama_as_an_image(client: openai.OpenAI, ollama: FakeOllama) -> None:
    ollama.reset()
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
        "rkJggg=="
    )
    client.responses.create(
        model=MODEL,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {
                        "type": "input_image",
                        "image_url": f"data:image/png;base64,{pixel}",
                        "detail": "auto",
                    },
                ],
            }
        ],
    )
    (message,) = last_messages(ollama)
    assert message["content"] == "What is this?"
    assert message["images"] == [pixel]


def test_answers_match_the_openapi_document(client: openai.OpenAI, stack: Stack) -> None:
    document = httpx.get(f"{stack.base_url}/openapi.json").json()

    def conforms(schema_name: str, value: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", **document}
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)

    made = client.responses.create(model="ollama/tooly:latest", input="x", tools=TOOLS)
    conforms("ResponseObject", made.to_dict())
    conforms("ResponseObject", client.responses.retrieve(made.id).to_dict())
    conforms("InputItemList", client.responses.input_items.list(made.id).to_dict())
    for e in client.responses.create(model=MODEL, input="x", stream=True):
        conforms("ResponseStreamEvent", e.to_dict())
