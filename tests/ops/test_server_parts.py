"""A served gateway runs on uvloop's event loop and httptools' HTTP parser, and the parser refuses bad HTTP.

Both are dependencies because they cut the gateway's CPU per request by
about an eighth (docs/performance.md, "uvloop and httptools"); uvicorn's loop "auto" picks uvloop
only when it imports, so a broken install would fall back to asyncio's loop
without a word. The process's memory map says which extension modules it
loaded. Requests the parser cannot read never reach the app: uvicorn answers
them with a 400 and closes the connection; the server keeps serving. A
request whose line and headers pass 16 KiB gets a 431 in OpenAI's error
shape (``gateway/http_head.py``: httptools itself has no bound, h11 had
this one), and one whose headers never end is cut off without being held.

The module's tests share one served gateway (:func:`served`): each speaks to it
on connections of its own and none changes it, and each serve start is a
process importing the whole gateway (seconds under test-busy).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Served, serving
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")

#: Raw requests no HTTP/1.1 parser may accept.
BAD_REQUESTS = {
    "garbage request line": b"HELLO\r\n\r\n",
    "space in the target": b"GET /heal thz HTTP/1.1\r\nHost: x\r\n\r\n",
    "two content lengths": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                            b"Content-Length: 3\r\n\r\n{}"),
    "content length not a number": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: x1\r\n\r\n{}",
    "chunk size not hex": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"zz\r\n{}\r\n0\r\n\r\n"),
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "unknown method": b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.fixture(scope="module")
def served(settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    """``govgate serve`` with the suite's settings for the module; yields its base URL and its log file."""
    log = tmp_path_factory.mktemp("server-parts") / "serve.log"
    with serving(settings, log) as base:
        yield base, log


def mapped_files(pid: int) -> set[str]:
    """Paths of the files mapped into process ``pid`` (its shared objects among them)."""
    return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def exchange(base: str, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection; everything the server answers until it closes (or 5 s pass)."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=5) as conn:
        conn.sendall(raw)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def read_response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response from a kept-alive connection: its head, then as many body bytes as its
    Content-Length says. (A single ``recv`` may return the head without the body: the server writes them apart.)"""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed mid-head: {answer[:200]!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed mid-body: {answer[:200]!r}"
        body += chunk
    assert len(body) == length, "more bytes than the response's Content-Length"
    return head + b"\r\n\r\n" + body


def test_a_served_gateway_runs_on_uvloop_and_httptools(served) -> None:
    base, _ = served
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    files = mapped_files(base.process.pid)
    assert any("/uvloop/loop.cpython-" in path for path in files), sorted(files)
    assert any("/httptools/parser/parser.cpython-" in path for path in files), sorted(files)


def test_requests_the_parser_cannot_read_get_a_400_and_the_server_serves_on(served) -> None:
    base, log_file = served
    answers = {name: exchange(base, raw) for name, raw in BAD_REQUESTS.items()}
    after = httpx.get(f"{base}/healthz", timeout=10)
    for name, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 400 "), (name, answer[:200])
        assert b"Traceback" not in answer, name
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower(), (name, head)
        assert json.loads(body)["error"]["code"] == "invalid_request", (name, body)
    assert after.status_code == 200
    log = log_file.read_text()
    assert "Traceback" not in log, log[-3000:]


def rss_kib(pid: int) -> int:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


def head_of(size: int, path: str = "/healthz") -> bytes:
    """A GET whose one extra header makes its head about ``size`` bytes."""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * size}\r\n\r\n".encode()


def test_a_request_head_over_16_kib_gets_a_431_in_openais_shape(served) -> None:
    base, _ = served
    answer = exchange(base, head_of(20 * 1024))
    after = httpx.get(f"{base}/healthz", timeout=10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in head.lower()
    # every answer names a request id (README), the parser's refusals too; both headers give the same one
    ids = {line.split(b":", 1)[1].strip() for line in head.lower().split(b"\r\n")
           if line.startswith((b"x-govgate-request-id:", b"x-request-id:"))}
    assert len(ids) == 1 and len(ids.pop()) == 32, head
    error = json.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
    assert "16384 bytes" in error["message"]
    assert after.status_code == 200


def test_heads_under_the_bound_pass_one_after_another_on_one_connection(served, keyring) -> None:
    """The bound is per request: two 12 KiB heads on a kept-alive connection, and a small head before a
    large body (read together with it), are all served. (The body is read whole: the key is good and the
    model unknown, so the app answers only once it has parsed it.)"""
    base, _ = served
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        answers = []
        for _ in range(2):
            conn.sendall(head_of(12 * 1024))
            answers.append(read_response(conn))
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "a" * 600_000}]}).encode()
    large = exchange(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + keyring["admin"].encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2
    assert all(json.loads(a.partition(b"\r\n\r\n")[2]) == {"status": "ok"} for a in answers)
    assert large.startswith(b"HTTP/1.1 404 "), large[:300]  # the app's answer (no such model), not the bound's
    assert b"model" in large.partition(b"\r\n\r\n")[2]


def test_headers_that_never_end_are_cut_off_without_being_held(served) -> None:
    """8 MiB of one header line, never finished: the server closes the connection long before, and its
    memory does not grow by what was sent (httptools alone held it all: +16 MB for 16 MB)."""
    base, _ = served
    pid = base.process.pid
    before = rss_kib(pid)
    url = urlsplit(base)
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            while sent < 8 * 1024 * 1024:
                conn.sendall(b"a" * 65536)
                sent += 65536
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    grown = rss_kib(pid) - before
    after = httpx.get(f"{base}/healthz", timeout=10)
    assert sent < 8 * 1024 * 1024, "the server read 8 MiB of an unfinished header"
    assert grown < 4 * 1024, f"the server's memory grew by {grown} KiB"
    assert after.status_code == 200


def _stream_request(version: bytes, key: str) -> bytes:
    body = json.dumps({"model": TINY_MODEL_NAME, "max_tokens": 3, "stream": True,
                       "messages": [{"role": "user", "content": "Count"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)


def test_an_http_1_0_stream_is_sent_unchunked_and_ended_by_closing(served, keyring, worker) -> None:
    """RFC 9112 6.1: no Transfer-Encoding to an HTTP/1.0 client (which read the chunk sizes as part of the
    stream); its stream's end is the connection's. An HTTP/1.1 client still gets it chunked."""
    base, _ = served
    old = exchange(base, _stream_request(b"1.0", keyring["admin"]))
    head, _, body = old.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")]
    assert lines[0].startswith(b"http/1.1 200"), old[:300]
    assert not any(line.startswith(b"transfer-encoding") for line in lines), head
    assert b"connection: close" in lines and not any(line.startswith(b"content-length") for line in lines)
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n"), body[-200:]
    events = [json.loads(part.removeprefix(b"data: ")) for part in body.split(b"\n\n")[:-2]]
    assert events and all(event["object"] == "chat.completion.chunk" for event in events)
    new = exchange(base, _stream_request(b"1.1", keyring["admin"]))
    assert b"transfer-encoding: chunked" in new.partition(b"\r\n\r\n")[0].lower()
    plain = exchange(base, b"GET /healthz HTTP/1.0\r\n\r\n")  # a length-framed answer is as it was
    assert b"content-length: 15" in plain.lower() and plain.endswith(b'{"status":"ok"}')
