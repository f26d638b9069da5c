"""A non-streamed request whose client leaves while its end is being recorded: the audit says it got nothing.

Probe s54 A2: a client that sent its request and closed its side of the
connection at once got no byte, yet about one try in four the audit held a
``completion`` whose ``client_output`` was the whole text (the disconnect
came after the wait for the outcome had stopped watching for it, while the
end was appended; uvicorn then dropped the answer without an error). The
served gateway now looks at its connection before it answers, and a closed
one gets a ``delivered`` entry with ``client_output`` empty beside the end.

Made deterministic with the database's write lock: the gateway's append of
the handed-over end (output rules on: the gateway records it) waits on it
while the client half-closes, then the lock is let go.
"""

from __future__ import annotations

import json
import socket
import time

import redis

from audit import AuditStore, make_engine
from govgate.processes import stop_process
from tests.conftest import serving, spawn_cli, wait_for_worker
from tests.e2e.test_stream_faults import wait_terminal
from tests.e2e.test_terminal_recovery import LOCKED_MAX_TOKENS, first_started, locked, own_key
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.registry import TINY_MODEL_NAME


def _send(base: str, key: str, body: dict) -> socket.socket:
    """A whole request on a raw connection (the test closes its side itself)."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)), timeout=60)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def test_a_client_gone_while_its_end_is_recorded_is_recorded_as_receiving_nothing(own_redis, tmp_path):
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}", request_timeout_s=120.0,
                          database_busy_timeout_s=30.0)
    key = own_key(own, "left-before-answer")
    store = AuditStore(make_engine(own.effective_database_url))
    client = redis.Redis.from_url(own.redis_url)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            # Long enough a generation for the lock to be taken before it ends (as the locked tests do).
            conn = _send(base, key, {"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": LOCKED_MAX_TOKENS,
                                     "temperature": 0})
            request_id = first_started(client)
            with locked(own.effective_database_url):
                deadline = time.monotonic() + 60
                while not client.hexists(PENDING_KEY, request_id):  # handed over: the gateway judges, then appends
                    assert time.monotonic() < deadline, "the output was never handed over"
                    time.sleep(0.01)
                time.sleep(2.0)  # the gateway has the outcome and waits on the lock to record the end
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.5)
            received = conn.recv(65536)
            conn.close()
            end = wait_terminal(store, request_id)
            deadline = time.monotonic() + 30
            while not any(e.kind == "delivered" for e in store.entries_for(request_id)):
                assert time.monotonic() < deadline, [e.kind for e in store.entries_for(request_id)]
                time.sleep(0.1)
        entries = store.entries_for(request_id)
        assert received == b""  # the answer went nowhere
        assert end.kind == "completion" and end.payload["client_output"]  # what it was to receive
        [delivered] = [e for e in entries if e.kind == "delivered"]
        assert delivered.body["terminal_seq"] == end.seq and delivered.body["ended_as"] == "completion"
        assert delivered.payload["client_output"] == ""  # and what it received
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        stop_process(worker, timeout_s=30)
        client.close()
