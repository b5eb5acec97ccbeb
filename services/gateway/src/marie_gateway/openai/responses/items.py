"""The Responses API's items, both ways: input items (and stored earlier turns)
into the chat request of the providers contract, and the chunks that come back
into output items, with the stream events OpenAI's SDKs expect on the way.

The request is translated into `openai.schemas.ChatParameters` and from there by
`openai.mapping.chat_request_to_proto`, the same translation `/v1/chat/completions`
uses: one mapping to the contract, not two."""

from __future__ import annotations

import secrets
import time
from typing import Any

from marie.providers.v1 import provider_service_pb2 as pb
from pydantic import TypeAdapter

from marie_gateway.http.errors import ApiError
from marie_gateway.openai.mapping import FINISH_REASONS
from marie_gateway.openai.responses.schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImagePart,
    InputItem,
    InputMessageItem,
    InputTextPart,
    NamedFunctionChoice,
    RefusalPart,
    ResponsesRequest,
)
from marie_gateway.openai.schemas import (
    ChatMessage,
    ChatParameters,
    FunctionCallBody,
    FunctionDefinitionBody,
    ImagePart,
    ImageUrlBody,
    JsonSchemaBody,
    NamedFunction,
    NamedToolChoice,
    ResponseFormatBody,
    TextPart,
    ToolBody,
    ToolCallBody,
)

#: Validates stored items (and items sent back by clients) as input items.
ITEMS = TypeAdapter(list[InputItem])
# Error codes a failed response may carry (OpenAI's ResponseError codes).
_ERROR_CODES = frozenset({"server_error", "rate_limit_exceeded", "invalid_prompt"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# --------------------------------------------------------------------------
# Input: items → chat messages
# --------------------------------------------------------------------------


def _text_of(parts: list[InputTextPart]) -> str:
    return "\n".join(p.text for p in parts)


def _message(item: InputMessageItem) -> ChatMessage:
    if isinstance(item.content, str):
        content: str | list[Any] = item.content
    elif any(isinstance(p, InputImagePart) for p in item.content):
        content = [
            ImagePart.model_construct(
                type="image_url",
                image_url=ImageUrlBody.model_construct(url=p.image_url, detail=p.detail),
            )
            if isinstance(p, InputImagePart)
            else TextPart.model_construct(
                type="text", text=p.refusal if isinstance(p, RefusalPart) else p.text
            )
            for p in item.content
        ]
    else:
        content = "\n".join(
            p.refusal if isinstance(p, RefusalPart) else p.text  # type: ignore[union-attr]
            for p in item.content
        )
    return ChatMessage.model_construct(role=item.role, content=content)


def chat_messages(items: list[Any], instructions: str | None) -> list[ChatMessage]:
    """The chat messages of `items` (validated input items), in order:
    consecutive function calls become one assistant message with tool calls
    (joined to the assistant's text just before them), outputs tool messages."""
    out: list[ChatMessage] = []
    if instructions:
        out.append(ChatMessage.model_construct(role="system", content=instructions))
    for item in items:
        if isinstance(item, InputMessageItem):
            out.append(_message(item))
        elif isinstance(item, FunctionCallItem):
            call = ToolCallBody.model_construct(
                id=item.call_id,
                type="function",
                function=FunctionCallBody.model_construct(name=item.name, arguments=item.arguments),
            )
            last = out[-1] if out else None
            if (
                last is not None
                and last.role == "assistant"
                and isinstance(last.content, str | None)
            ):
                out[-1] = ChatMessage.model_construct(
                    role="assistant",
                    content=last.content or None,
                    tool_calls=[*(last.tool_calls or ()), call],
                )
            else:
                out.append(
                    ChatMessage.model_construct(role="assistant", content=None, tool_calls=[call])
                )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _text_of(item.output)
            out.append(
                ChatMessage.model_construct(role="tool", content=output, tool_call_id=item.call_id)
            )
    return out


def chat_parameters(body: ResponsesRequest, messages: list[ChatMessage]) -> ChatParameters:
    """The chat request that answers `body`, given the whole conversation."""
    response_format = None
    fmt = body.text.format if body.text else None
    if fmt is not None:
        schema = None
        if fmt.type == "json_schema":
            schema = JsonSchemaBody.model_construct(
                name=fmt.name, description=fmt.description, schema_=fmt.schema_, strict=fmt.strict
            )
        response_format = ResponseFormatBody.model_construct(type=fmt.type, json_schema=schema)
    tools = [
        ToolBody.model_construct(
            type="function",
            function=FunctionDefinitionBody.model_construct(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in body.tools or ()
    ]
    choice: Any = body.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        choice = NamedToolChoice.model_construct(
            type="function", function=NamedFunction.model_construct(name=choice.name)
        )
    return ChatParameters.model_construct(
        messages=messages,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_output_tokens,
        response_format=response_format,
        tools=tools or None,
        tool_choice=choice,
        user=body.user,
    )


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items in the shape `input_items` lists them:
    every item with an id and a status, message content as a list of parts."""
    if isinstance(body.input, str):
        return [_message_item("user", [{"type": "input_text", "text": body.input}])]
    out: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, InputMessageItem):
            if isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                parts: list[dict[str, Any]] = [{"type": kind, "text": item.content}]
            else:
                parts = [p.model_dump(exclude_none=True) for p in item.content]
            for part in parts:
                if part["type"] == "output_text":
                    part.setdefault("annotations", [])
                elif part["type"] == "input_image":
                    part.setdefault("detail", "auto")
            out.append(_message_item(item.role, parts, item.id))
        else:
            dumped = item.model_dump(exclude_none=True)
            prefix = "fc" if isinstance(item, FunctionCallItem) else "fco"
            dumped["id"] = item.id or new_id(prefix)
            dumped["status"] = "completed"
            out.append(dumped)
    return out


def _message_item(
    role: str, parts: list[dict[str, Any]], item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": role,
        "content": parts,
        "status": "completed",
    }


# --------------------------------------------------------------------------
# Output: chunks → items and events
# --------------------------------------------------------------------------


def response_object(
    body: ResponsesRequest, response_id: str, created_at: int, model: str
) -> dict[str, Any]:
    """A response as OpenAI shapes it, before its output: what the request
    asked for, with OpenAI's defaults where it asked nothing."""
    fmt: dict[str, Any] = {"type": "text"}
    if body.text and body.text.format:
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True)
    choice: Any = body.tool_choice or "auto"
    if isinstance(choice, NamedFunctionChoice):
        choice = choice.model_dump()
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "model": model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.store,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": fmt, "verbosity": (body.text and body.text.verbosity) or "medium"},
        "tool_choice": choice,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "top_logprobs": 0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def usage_object(usage: pb.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class ResponseBuilder:
    """Folds chunks into a response's output items; every step returns the
    stream events it makes (a non-streaming answer drops them), numbered by
    `sequence_number` from 0."""

    def __init__(self, response: dict[str, Any], *, parallel_tool_calls: bool) -> None:
        self.response = response
        self._parallel = parallel_tool_calls
        self._seq = 0
        self._message: dict[str, Any] | None = None
        self._text: list[str] = []
        # Open function calls by the chunks' tool-call index.
        self._calls: dict[int, dict[str, Any]] = {}
        self._first_call: int | None = None
        self._message_index = 0
        self.finish: str | None = None
        self.usage: pb.Usage | None = None

    @property
    def output(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.response["output"]
        return out

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        payload = {"type": type_, **fields, "sequence_number": self._seq}
        self._seq += 1
        return payload

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": list(self.output)}

    def start(self) -> list[dict[str, Any]]:
        snapshot = self._snapshot()
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def add(self, chunk: pb.StreamChatCompletionResponse) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.content:
            if self._message is None:
                events += self._open_message()
            self._text.append(chunk.content)
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._message["id"],  # type: ignore[index]
                    output_index=self._message_index,
                    content_index=0,
                    delta=chunk.content,
                    logprobs=[],
                )
            )
        for tc in chunk.tool_calls:
            if self._first_call is None:
                self._first_call = tc.index
            elif not self._parallel and tc.index != self._first_call:
                continue  # parallel_tool_calls false: the first call only
            item = self._calls.get(tc.index)
            if item is None:
                if self._message is not None:
                    events += self._close_message()
                item = {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "arguments": "",
                    "call_id": tc.id or new_id("call"),
                    "name": tc.name,
                }
                self._calls[tc.index] = item
                self.output.append(item)
                events.append(
                    self._event(
                        "response.output_item.added",
                        output_index=len(self.output) - 1,
                        item=dict(item),
                    )
                )
            elif tc.name and not item["name"]:
                item["name"] = tc.name
            if tc.arguments:
                item["arguments"] += tc.arguments
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=self.output.index(item),
                        delta=tc.arguments,
                    )
                )
        if chunk.finish_reason:
            self.finish = FINISH_REASONS.get(chunk.finish_reason)
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        item: dict[str, Any] = {
            "id": new_id("msg"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._message = item
        self._text = []
        self.output.append(item)
        self._message_index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event(
                "response.output_item.added", output_index=self._message_index, item=dict(item)
            ),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._message_index,
                content_index=0,
                part=part,
            ),
        ]

    def _item_status(self) -> str:
        return "incomplete" if self.finish in ("length", "content_filter") else "completed"

    def _close_message(self) -> list[dict[str, Any]]:
        item, self._message = self._message, None
        assert item is not None
        text = "".join(self._text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item["content"] = [part]
        item["status"] = self._item_status()
        where = {"item_id": item["id"], "output_index": self._message_index, "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=part),
            self._event(
                "response.output_item.done", output_index=self._message_index, item=dict(item)
            ),
        ]

    def finish_events(self) -> list[dict[str, Any]]:
        """Close what is open and end the response: `response.completed`, or
        `response.incomplete` when the model was cut off."""
        events: list[dict[str, Any]] = []
        if not self.output:
            events += self._open_message()  # no answer at all: an empty message
        if self._message is not None:
            events += self._close_message()
        for item in self._calls.values():
            if item["status"] != "in_progress":
                continue
            item["status"] = self._item_status()
            index = self.output.index(item)
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        response = self.response
        response["completed_at"] = int(time.time())
        if self.usage is not None:
            response["usage"] = usage_object(self.usage)
        if self.finish in ("length", "content_filter"):
            response["status"] = "incomplete"
            reason = "max_output_tokens" if self.finish == "length" else "content_filter"
            response["incomplete_details"] = {"reason": reason}
            events.append(self._event("response.incomplete", response=self._snapshot()))
        else:
            response["status"] = "completed"
            events.append(self._event("response.completed", response=self._snapshot()))
        return events

    def failed(self, error: ApiError) -> list[dict[str, Any]]:
        """The response failed mid-way: an `error` event, then `response.failed`
        with what was produced so far."""
        code = error.code if error.code in _ERROR_CODES else "server_error"
        # What had arrived is part of the answer (its deltas were sent): the
        # open items keep it, marked incomplete.
        self._close_incomplete()
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": error.message}
        if self.usage is not None:
            self.response["usage"] = usage_object(self.usage)
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=self._snapshot()),
        ]

    def _close_incomplete(self) -> None:
        """Close the open items without events, as cut short."""
        if self._message is not None:
            item = self._message
            self._close_message()
            item["status"] = "incomplete"
        for item in self._calls.values():
            if item["status"] == "in_progress":
                item["status"] = "incomplete"

    def cancelled(self) -> None:
        """The client left mid-answer: what is kept says so."""
        if self._message is not None:
            self._close_message()
        self.response["status"] = "cancelled"
