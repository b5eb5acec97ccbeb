"""Who an extraction is recorded under: the key id and owner carried through
the durable queue (additively: jobs queued before the fields existed still
decode), and the tenant of a gateway-encoded user id as the fallback owner."""

from __future__ import annotations

import json

from marie_memory.extraction.extractor import tenant_of
from marie_memory.job_payload import decode_request, encode_request
from marie_memory.records import AddRequest, SourceMessage


def test_the_key_travels_through_the_queue() -> None:
    request = AddRequest(
        user_id="4:acme/bob",
        messages=(SourceMessage(1, "hi", ""),),
        key_id="key_01",
        key_owner="acme",
    )
    decoded = decode_request(encode_request(request))
    assert (decoded.key_id, decoded.key_owner) == ("key_01", "acme")


def test_a_job_queued_before_the_key_fields_still_decodes() -> None:
    old = json.loads(encode_request(AddRequest(user_id="u", messages=())))
    del old["key_id"], old["key_owner"]
    decoded = decode_request(json.dumps(old))
    assert (decoded.user_id, decoded.key_id, decoded.key_owner) == ("u", "", "")


def test_the_tenant_of_an_encoded_user_id() -> None:
    assert tenant_of("4:acme/bob") == "acme"
    assert tenant_of("6:a/b:cd/e") == "a/b:cd"
    assert tenant_of("plain-user") == ""
    assert tenant_of("9:short/x") == ""
