"""A body still arriving when the gateway stops is refused at once on every endpoint that reads one, not only
on the completion endpoints (probe q1 F4).

Before, only the completions ended such a read at the drain's begin: an upload to ``POST /admin/keys``, the
review API or a console form held its connection through the drain until uvicorn's graceful timeout
cancelled it, and its client got a plain-text 500 (``Internal Server Error``), the log a ``CancelledError``
traceback. Real parts: ``govgate serve`` (uvicorn) with a 60 s drain, the suite's Redis and database.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

from tests.conftest import bearer, serving
from tests.keys_and_limits import new_key


def _upload_start(base: str, method: str, path: str, headers: dict[str, str], body: bytes) -> socket.socket:
    """A raw connection that sent a request's head and the first bytes of its body, no more: a client still
    uploading its body when the gateway is told to stop."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=30)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    client.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                   + body[:5])
    return client


def _answer(client: socket.socket) -> tuple[http.client.HTTPResponse, bytes]:
    """The response on ``client`` (the socket's 30 s timeout bounds the wait)."""
    try:
        response = http.client.HTTPResponse(client)
        response.begin()
        return response, response.read()
    finally:
        client.close()


def test_an_upload_to_any_endpoint_is_refused_at_the_stop_in_its_error_shape(settings, keyring, tmp_path) -> None:
    own = settings.with_(drain_s=60.0)
    admin = {"Authorization": f"Bearer {keyring['admin']}", "Content-Type": "application/json"}
    reviewer = {"Authorization": f"Bearer {new_key(own, 'drain-reviewer', 'ops', roles=('reviewer',))}",
                "Content-Type": "application/json"}
    api_uploads = {
        "create a key": ("POST", "/admin/keys", admin, {"user": "slowadmin", "team": "t9", "roles": ["analyst"]}),
        "set a key's roles": ("PUT", "/admin/keys/key_0123456789ab/roles", admin, {"roles": ["analyst"]}),
        "flag a request": ("POST", "/v1/audit/requests/0123456789abcdef0123456789abcdef/flag", reviewer,
                           {"note": "a note long enough to be sent slowly"}),
    }
    log = tmp_path / "serve.log"
    with serving(own, log) as base:
        clients = {name: _upload_start(base, method, path, headers, json.dumps(body).encode())
                   for name, (method, path, headers, body) in api_uploads.items()}
        clients["console sign-in"] = _upload_start(
            base, "POST", "/console/sign-in", {"Content-Type": "application/x-www-form-urlencoded"},
            b"key=sk-not-a-key&csrf_token=0123456789abcdef&next=%2Fconsole")
        time.sleep(1.0)  # lets each request reach its body's read (one that comes later is refused too)
        base.process.send_signal(signal.SIGTERM)
        answers = {name: _answer(client) for name, client in clients.items()}
        assert base.process.wait(timeout=30) is not None  # long before its 60 s drain would have ended

    for name in api_uploads:
        response, body = answers[name]
        assert response.status == 503, (name, response.status, body[:300])
        assert response.getheader("content-type", "").startswith("application/json"), name
        error = json.loads(body)["error"]
        assert error["code"] == "shutting_down" and "nothing was run" in error["message"], (name, error)
        assert response.getheader("retry-after"), name
    page, html = answers["console sign-in"]  # the console answers with its own page, as its other refusals
    assert page.status == 503 and page.getheader("content-type", "").startswith("text/html"), html[:300]
    assert b"shutting_down" in html and page.getheader("retry-after")
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
