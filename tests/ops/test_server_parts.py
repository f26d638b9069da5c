"""A served gateway runs on uvloop's event loop and httptools' HTTP parser, and the parser refuses bad HTTP.

Both are dependencies because they cut the gateway's CPU per request by
about an eighth (README, "Performance"); uvicorn picks them only when they
import, so a broken install would fall back to asyncio's loop and h11
without a word. The process's memory map says which extension modules it
loaded. Requests the parser cannot read never reach the app: uvicorn answers
them with a 400 and closes the connection; the server keeps serving.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import serving

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
}


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


def test_a_served_gateway_runs_on_uvloop_and_httptools(settings, tmp_path) -> None:
    with serving(settings, tmp_path / "serve.log") as base:
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        files = mapped_files(base.process.pid)
    assert any("/uvloop/loop.cpython-" in path for path in files), sorted(files)
    assert any("/httptools/parser/parser.cpython-" in path for path in files), sorted(files)


def test_requests_the_parser_cannot_read_get_a_400_and_the_server_serves_on(settings, tmp_path) -> None:
    with serving(settings, tmp_path / "serve.log") as base:
        answers = {name: exchange(base, raw) for name, raw in BAD_REQUESTS.items()}
        after = httpx.get(f"{base}/healthz", timeout=10)
    for name, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 400 "), (name, answer[:200])
        assert b"Traceback" not in answer, name
    assert after.status_code == 200
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]
