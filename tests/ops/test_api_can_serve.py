"""``govgate up``'s wait on ``/readyz``: the API may serve once its own dependencies answer, workers aside."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Iterator

import pytest

from govgate.stack import api_not_ready


@pytest.fixture
def answering() -> Iterator:
    """A loopback server answering ``/readyz`` with the status and body a test sets."""
    reply = {"status": 200, "body": b"{}"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(reply["status"])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def set_reply(status: int, body: bytes) -> str:
        reply.update(status=status, body=body)
        return f"http://127.0.0.1:{server.server_port}/readyz"

    yield set_reply
    server.shutdown()
    server.server_close()


def checks(**overrides: str) -> bytes:
    document = {"database": "ok", "redis": "ok", "policy": "ok", "workers": "error: no live worker for m"}
    document.update(overrides)
    return json.dumps({"status": "unavailable", "checks": document}).encode()


def test_ready_or_only_workers_missing_counts_as_serving(answering):
    assert api_not_ready(answering(200, b"{}")) is None
    assert api_not_ready(answering(503, checks())) is None


@pytest.mark.parametrize("status, body", [
    (503, checks(redis="error: Redis: ConnectionError")),
    (503, checks(database="error: OperationalError")),
    (503, checks(policy="error: not loaded")),
    (503, b"not json"),
    (503, b'{"checks": null}'),
    (500, checks()),
])
def test_anything_else_does_not(answering, status, body):
    assert api_not_ready(answering(status, body))


def test_nothing_listening_does_not(answering):
    url = answering(200, b"{}").rsplit(":", 1)[0] + ":1/readyz"
    assert api_not_ready(url).startswith("no answer")


def test_the_reason_names_each_failing_check_of_the_api_and_not_the_workers(answering):
    why = api_not_ready(answering(503, checks(
        redis="error: refuses writes: OutOfMemoryError: command not allowed when used memory > 'maxmemory'.",
        policy="error: not loaded")))
    assert why == ("redis: error: refuses writes: OutOfMemoryError: command not allowed when used memory > "
                   "'maxmemory'.; policy: error: not loaded")
    assert api_not_ready(answering(500, checks())) == "/readyz answered 500"
    assert api_not_ready(answering(503, b"not json")) == "/readyz answered 503 without its checks"
