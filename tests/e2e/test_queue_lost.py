"""Requests whose queued job a Redis restarted empty lost get 503 ``queue_lost`` in seconds, not at their timeout.

A served gateway, a tiny-model worker and a Redis of their own
(``own_redis_gateway``); the worker is stopped (SIGSTOP) so the jobs wait in
the queue, and Redis is killed and started again without its data (probe s57
D4: before, each client waited its whole request timeout, here 600 s, and got
504). The unit tests of the parts are ``tests/gateway/test_lost_jobs.py``.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from govgate.redis_server import RedisProcess
from tests.conftest import bearer
from tests.e2e.test_stream_faults import own_redis_gateway, stream_once, wait_terminal  # noqa: F401 - fixture
from workers.contract.registry import TINY_MODEL_NAME

#: Far longer than the test waits: only the lost-job look can end these requests in time.
_LONG_WAIT = {"request_timeout_s": 600.0}


def _newest_seq(audit_store) -> int:
    return max((entry.seq for entry in audit_store.tail(1)), default=0)


def _requests_recorded(audit_store, n: int, after_seq: int, timeout_s: float = 60) -> list[str]:
    """The ids of the first ``n`` request entries after ``after_seq`` (the store is the session's: other
    tests' entries come before)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = [entry.request_id for entry in audit_store.tail(50) if entry.kind == "request" and entry.seq > after_seq]
        if len(ids) >= n:
            return ids[-n:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} request entries")


@pytest.mark.parametrize("own_redis_gateway", [_LONG_WAIT], indirect=True)
def test_requests_whose_jobs_redis_lost_are_answered_queue_lost_and_the_next_is_served(own_redis_gateway, keyring,
                                                                                      audit_store):
    state = own_redis_gateway
    worker = state["worker"]
    body = {"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 4, "temperature": 0}
    before = _newest_seq(audit_store)
    os.kill(worker.pid, signal.SIGSTOP)  # the jobs stay in the queue
    try:
        with ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, f"{state['base']}/v1/completions", headers=bearer(keyring["admin"]),
                                json=body, timeout=90)
            streamed = pool.submit(stream_once, state["base"], keyring["admin"], body)
            ids = _requests_recorded(audit_store, 2, before)
            time.sleep(0.5)  # queued after their entries
            restarted = time.monotonic()
            state["redis"].stop()
            state["redis"] = RedisProcess.start(state["dir"], persist=False)  # without the queue
            response = whole.result(timeout=80)
            stream = streamed.result(timeout=80)
            answered_after = time.monotonic() - restarted
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_lost"
    assert response.headers["retry-after"] == "1"
    assert not stream["done"] and stream["last"]["error"]["code"] == "queue_lost", stream
    assert answered_after < 60  # the looks come 10 and 20 s after the reconnect; the timeout is 600 s
    assert {response.headers["x-govgate-request-id"], stream["request_id"]} == set(ids)
    for request_id in ids:
        terminal = wait_terminal(audit_store, request_id)
        assert terminal.kind == "failed" and terminal.body["error"]["code"] == "queue_lost", terminal.body
        assert [e.kind for e in audit_store.entries_for(request_id)].count("failed") == 1
    log = Path(state["log"]).read_text()
    assert "Redis came back without the data it held" in log
    assert "Traceback" not in log
    # the worker, back, serves the next request from the new Redis
    served = httpx.post(f"{state['base']}/v1/completions", headers=bearer(keyring["admin"]), json=body, timeout=60)
    assert served.status_code == 200, served.text
    for request_id in ids:  # and nothing ran the lost jobs after all
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "failed"]
