"""HTTP as OpenAI's clients and plain HTTP tools speak it, against ``govgate serve`` (a real uvicorn process):
content codings of request bodies, ``Expect: 100-continue`` and the connection kept alive after a refusal."""

from __future__ import annotations

import gzip
import json

import httpx

from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

BODY = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def test_a_compressed_body_is_refused_by_name_not_read_as_broken_json(served_api, keyring, audit_store):
    """A gzipped body was read as JSON (400 "invalid character (byte 0)"); it is a 415 naming the coding."""
    headers = {**bearer(keyring["analyst"]), "Content-Type": "application/json"}
    plain = json.dumps(BODY).encode()
    gzipped = httpx.post(f"{served_api}/v1/chat/completions", content=gzip.compress(plain), timeout=60,
                         headers={**headers, "Content-Encoding": "gzip"})
    assert gzipped.status_code == 415, gzipped.text
    error = gzipped.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("unsupported_content_encoding",
                                                              "invalid_request_error", None)
    assert "Content-Encoding: gzip" in error["message"]
    assert gzipped.headers["accept-encoding"] == "identity"
    request_id = gzipped.headers["x-govgate-request-id"]
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["rejected"]
    # a coding the body does not even have is not ignored either; "identity" is no coding at all
    labelled = httpx.post(f"{served_api}/v1/completions", content=json.dumps(
        {"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 2}), headers={**headers, "Content-Encoding": "br"},
        timeout=60)
    assert (labelled.status_code, labelled.json()["error"]["code"]) == (415, "unsupported_content_encoding")
    identity = httpx.post(f"{served_api}/v1/chat/completions", content=plain, timeout=60,
                          headers={**headers, "Content-Encoding": "identity"})
    assert identity.status_code == 200, identity.text
    assert identity.json()["usage"]["completion_tokens"] == 2
