"""The trace context an extraction job carries in its payload."""

from __future__ import annotations

import json

from marie_memory.job_payload import decode_request, decode_trace_context, encode_request
from marie_memory.records import AddRequest, SourceMessage

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def test_the_payload_keeps_the_queuing_calls_trace_context_beside_the_request() -> None:
    request = AddRequest(user_id="u", messages=(SourceMessage(role=1, content="hi"),))
    payload = encode_request(request, PARENT)
    assert decode_request(payload) == request
    assert decode_trace_context(payload) == PARENT


def test_a_payload_without_one_or_with_a_bad_one_has_none() -> None:
    request = AddRequest(user_id="u", messages=())
    assert decode_trace_context(encode_request(request)) == {}
    assert "trace_context" not in json.loads(encode_request(request, {}))
    bad = json.loads(encode_request(request))
    bad["trace_context"] = {"traceparent": 7, "tracestate": "a=b"}
    assert decode_trace_context(json.dumps(bad)) == {"tracestate": "a=b"}
    bad["trace_context"] = "00-..."
    assert decode_trace_context(json.dumps(bad)) == {}
    assert decode_trace_context("not json") == {}
