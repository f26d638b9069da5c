"""A body still arriving holds no place at the admission gate; a client that closes before the body's end is
counted and audited as the client's doing (499 ``client_closed``), not as a server error.

Found by probing a served gateway: the gate's place was taken before the
body was read, so as many connections as the gate has places, each sending
its headers and then never its body, held every place for as long as they
stayed open, and every other team's completion waited the gate's whole wait
(``GOVGATE_POLICY_WAIT_TIMEOUT_S``, 5 s by default) behind them. A client that
closed mid-upload was counted under ``status="5xx", code="server_error"``
(Litestar raises a 500 for it) and left no audit entry.
"""

from __future__ import annotations

import socket
import time

import httpx

from audit.kinds import REJECTED
from tests.conftest import bearer, serving
from tests.ops.metrics_text import samples, value
from workers.contract.registry import TINY_MODEL_NAME

ENDPOINT = "/v1/chat/completions"


def _unfinished_upload(base: str, key: str) -> socket.socket:
    """A connection that has sent a completion's headers and the first bytes of its 500-byte body."""
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(b"POST " + ENDPOINT.encode() + b" HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\":")
    return conn


def test_an_unfinished_upload_holds_no_place_and_a_closed_one_is_the_clients(settings, worker, keyring, audit_store,
                                                                          tmp_path) -> None:
    # one place at the gate, and a wait for it far longer than the request's own timeout: a request queued
    # behind an upload that holds the place would time out here, not be served
    own = settings.with_(admission_concurrency=1, policy_wait_timeout_s=600.0)
    with serving(own, tmp_path / "serve.log") as base:
        metrics = {"Authorization": f"Bearer {keyring['admin']}"}
        before = samples(httpx.get(base + "/metrics", headers=metrics, timeout=30).text)
        head = audit_store.head()
        holder = _unfinished_upload(base, keyring["analyst"])
        try:
            time.sleep(0.5)  # its headers are read and its handler waits for the body
            served = httpx.post(base + ENDPOINT, headers=bearer(keyring["admin"]), timeout=60,
                                json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2})
            assert served.status_code == 200, served.text
        finally:
            holder.close()
        deadline = time.monotonic() + 30
        while True:
            new = [e for e in audit_store.tail(20) if (head is None or e.seq > head.seq) and e.kind == REJECTED]
            if new or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [e.body["error"]["code"] for e in new] == ["client_closed"], [e.body for e in new]
        assert new[0].body["status"] == 499 and new[0].body["body_bytes"] == 0
        after = samples(httpx.get(base + "/metrics", headers=metrics, timeout=30).text)

    def count(status: str, code: str) -> float:
        return (value(after, "govgate_requests_total", endpoint=ENDPOINT, model="", status=status, code=code)
                - value(before, "govgate_requests_total", endpoint=ENDPOINT, model="", status=status, code=code))

    assert count("4xx", "client_closed") == 1
    assert count("5xx", "server_error") == 0
