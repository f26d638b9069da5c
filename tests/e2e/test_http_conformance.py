"""HTTP as OpenAI's clients and plain HTTP tools speak it, against ``govgate serve`` (a real uvicorn process):
content codings of request bodies, ``Expect: 100-continue`` and the connection kept alive after a refusal."""

from __future__ import annotations

import gzip
import json
import socket
import time
from typing import Any
from urllib.parse import urlparse

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


def _connect(base: str) -> socket.socket:
    url = urlparse(base)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def _read_answer(conn: socket.socket) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response (with ``Content-Length``) from ``conn``: status line, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        assert more, f"the connection closed before a whole response head: {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        more = conn.recv(65536)
        assert more, "the connection closed inside a response body"
        rest += more
    return status, headers, rest[:length]


def _closed(conn: socket.socket) -> bool:
    """The server has closed ``conn`` (a read returns end of file)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_request_refused_before_its_100_continue_closes_its_connection(served_api, keyring):
    """Refused before its body was asked for (no ``100 Continue``), the client does not send the body; the
    connection stayed open owing it, and the client's next request was read as that body (a 400). Now the
    answer says ``Connection: close`` and the server closes; a body that was asked for keeps the connection."""
    body = json.dumps(BODY).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(body))
    models = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n\r\n" % keyring["admin"].encode()
    with _connect(served_api) as refused:
        refused.sendall(head + b"Authorization: Bearer gk_unknown_key\r\n\r\n")
        status, headers, answer = _read_answer(refused)
        assert status.startswith(b"HTTP/1.1 401"), status
        assert json.loads(answer)["error"]["code"] == "invalid_api_key"
        assert headers[b"connection"] == b"close"
        assert _closed(refused)
    with _connect(served_api) as served:
        served.sendall(head + b"Authorization: Bearer %s\r\n\r\n" % keyring["analyst"].encode())
        status, _, _ = _read_answer(served)
        assert status == b"HTTP/1.1 100 Continue"
        served.sendall(body)
        status, headers, answer = _read_answer(served)
        assert status.startswith(b"HTTP/1.1 200"), (status, answer)
        assert json.loads(answer)["usage"]["completion_tokens"] == 2
        assert b"connection" not in headers
        served.sendall(models)  # the same connection serves on
        status, _, answer = _read_answer(served)
        assert status.startswith(b"HTTP/1.1 200"), (status, answer)
        assert TINY_MODEL_NAME in [model["id"] for model in json.loads(answer)["data"]]


def _with_purpose(base: str, key: str, *purpose_lines: bytes) -> tuple[bytes, dict[str, Any], str]:
    """A chat request with these ``X-Govgate-Purpose`` header lines, sent byte for byte (no client library
    between: httpx's test transport re-encodes header bytes and joins repeated headers); status, body, id."""
    body = json.dumps(BODY).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n" % (key.encode(), len(body)))
    with _connect(base) as conn:
        conn.sendall(head + b"".join(b"X-Govgate-Purpose:%s\r\n" % line for line in purpose_lines) + b"\r\n" + body)
        status, headers, answer = _read_answer(conn)
    return status, json.loads(answer), headers[b"x-govgate-request-id"].decode()


def test_the_purpose_header_is_read_as_utf8_once(served_api, keyring, audit_store):
    """The header's bytes are UTF-8 text (they were read as Latin-1: ``évaluation`` reached the policy as
    ``Ã©valuation``); bytes that are not UTF-8, or the header twice, are 422 naming it, and nothing of the
    refused value is kept in the audit entry (tests/gateway/test_declared_purpose.py checks the logs)."""
    key = keyring["analyst"]
    status, answer, request_id = _with_purpose(served_api, key, " \xe9valuation \t".encode("utf-8"))
    assert status.startswith(b"HTTP/1.1 200"), (status, answer)
    entries = audit_store.entries_for(request_id)
    assert entries[0].kind == "request" and entries[0].body["purpose"] == "évaluation"  # HTTP strips the spaces

    refusals = [(b" ZQXlatin \xe9valuation",), (b"research", b"ZQXsecond"), (b"research", b"research")]
    for lines in refusals:
        status, answer, request_id = _with_purpose(served_api, key, *lines)
        assert status.startswith(b"HTTP/1.1 422"), (lines, status, answer)
        error = answer["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value",
                                                                  "X-Govgate-Purpose")
        assert "ZQX" not in error["message"]
        entries = audit_store.entries_for(request_id)
        assert [e.kind for e in entries] == ["rejected"], lines
        assert entries[0].body["error"]["param"] == "X-Govgate-Purpose"
        assert "ZQX" not in json.dumps(entries[0].body)


def test_a_body_whose_chunked_framing_breaks_is_answered_under_its_entrys_request_id(served_api, keyring,
                                                                                      audit_store):
    """The parser's 400 for a broken chunk named a new id while the app recorded the request's ``rejected``
    entry under its own (probe s54): the served protocol now gives the id when the head is read, and both use
    it, whether the app began reading the body (two sends) or the head and the broken chunk came at once."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % keyring["analyst"].encode())
    first = b'{"model": "'
    for sends in ([head + b"%x\r\n%s\r\n" % (len(first), first), b"zz\r\n}\r\n0\r\n\r\n"],
                  [head + b"%x\r\n%s\r\nzz\r\n}\r\n0\r\n\r\n" % (len(first), first)]):
        with _connect(served_api) as conn:
            for raw in sends:
                conn.sendall(raw)
                if raw is not sends[-1]:
                    _wait_for_an_entry_to_start(conn)
            status, headers, answer = _read_answer(conn)
            assert _closed(conn)
        assert status.startswith(b"HTTP/1.1 400"), (status, answer)
        assert json.loads(answer)["error"]["code"] == "invalid_request"
        request_id = headers[b"x-govgate-request-id"].decode()
        assert headers[b"x-request-id"].decode() == request_id
        entries = _entries_once_written(audit_store, request_id)
        assert [(e.kind, e.body["error"]["code"]) for e in entries] == [("rejected", "client_closed")], sends


def _wait_for_an_entry_to_start(conn: socket.socket) -> None:
    """Give the app the moment it needs to begin reading the body sent so far (nothing comes back on ``conn``)."""
    conn.settimeout(0.3)
    try:
        assert conn.recv(1) == b"", "an answer before the body's end"
    except TimeoutError:
        pass
    finally:
        conn.settimeout(30)


def _entries_once_written(audit_store, request_id: str, timeout_s: float = 30.0) -> list:
    """The audit entries of ``request_id`` once there is one (the app writes it after the 400 went out)."""
    deadline = time.monotonic() + timeout_s
    while not (entries := audit_store.entries_for(request_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return entries


def test_a_transfer_coding_under_the_chunks_is_refused_by_name(served_api, keyring, audit_store):
    """``Transfer-Encoding: gzip, chunked`` was read as plain chunked: the gzipped bytes inside the chunks went
    to the JSON decoder. RFC 9112 6.1: a transfer coding the server does not apply is a 501."""
    packed = gzip.compress(json.dumps(BODY).encode())
    with _connect(served_api) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (keyring["analyst"].encode(), len(packed), packed))
        status, headers, answer = _read_answer(conn)
    assert status.startswith(b"HTTP/1.1 501"), (status, answer)
    error = json.loads(answer)["error"]
    assert (error["code"], error["param"]) == ("unsupported_transfer_encoding", None)
    assert "Transfer-Encoding: gzip" in error["message"]
    assert headers[b"x-should-retry"] == b"false"  # OpenAI's clients retry a 5xx twice otherwise
    entries = audit_store.entries_for(headers[b"x-govgate-request-id"].decode())
    assert [(e.kind, e.body["error"]["code"]) for e in entries] == [("rejected", "unsupported_transfer_encoding")]


def test_a_body_declared_in_a_charset_other_than_utf8_is_refused_by_name(served_api, keyring, audit_store):
    """A UTF-16 body declared as such was read as UTF-8 (400 "not valid JSON"); JSON is UTF-8 (RFC 8259). The
    media type is not checked: curl -d labels its JSON ``application/x-www-form-urlencoded``."""
    url, plain = f"{served_api}/v1/chat/completions", json.dumps(BODY)
    refused = httpx.post(url, content=plain.encode("utf-16"), timeout=60, headers={
        **bearer(keyring["analyst"]), "Content-Type": "application/json; charset=UTF-16"})
    assert refused.status_code == 415, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_media_type", None)
    assert "charset=UTF-16" in error["message"]
    entries = audit_store.entries_for(refused.headers["x-govgate-request-id"])
    assert [(e.kind, e.body["error"]["code"]) for e in entries] == [("rejected", "unsupported_media_type")]
    for content_type in ('application/json; charset="utf-8"', "application/json;charset=US-ASCII",
                         "application/x-www-form-urlencoded", "text/plain"):
        served = httpx.post(url, content=plain.encode(), timeout=60,
                            headers={**bearer(keyring["analyst"]), "Content-Type": content_type})
        assert served.status_code == 200, (content_type, served.text)
