"""A gateway killed while its job waits in the queue: the job is recorded, not generated for nobody.

Real parts: a Redis, a tiny-model worker (solo pool) and a served gateway of the
test's own, on the suite's database. The worker is held (SIGSTOP) so that the
job waits; the gateway is SIGKILLed (no drain, nothing taken back); the worker
resumes once the gateway's heartbeat has run out
(``workers.contract.gateway_liveness``).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_stream_faults import wait_terminal
from workers.contract.fair_queues import waiting_key
from workers.contract.gateway_liveness import GATEWAY_BEAT_TTL_S, GATEWAY_GONE
from workers.contract.registry import TINY_MODEL_NAME
from workers.contract.unsettled import UNSETTLED_KEY


@pytest.fixture
def own_stack(settings, tmp_path):
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-gd-"))
    server = RedisProcess.start(redis_dir, persist=False)
    own = settings.with_(redis_url=server.url)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        yield own, worker
    finally:
        os.kill(worker.pid, signal.SIGCONT)  # (a no-op unless the test failed while it was held)
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


def _newest_request(audit_store, after_seq: int, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in audit_store.tail(10) if e.kind == "request" and e.seq > after_seq]
        if found:
            return found[-1].request_id
        time.sleep(0.05)
    raise AssertionError("the request was not recorded")


def _queued(client: redis.Redis, timeout_s: float = 30) -> None:
    """Until the job is on the model's queue (its push, which follows the request entry, counts it waiting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(int(count) > 0 for count in client.hvals(waiting_key(TINY_MODEL_NAME))):
            return
        time.sleep(0.05)
    raise AssertionError("the job never reached the queue")


def test_a_job_queued_by_a_gateway_killed_since_is_recorded_cancelled_not_generated(own_stack, keyring,
                                                                                  audit_store, tmp_path):
    own, worker = own_stack
    client = redis.Redis.from_url(own.redis_url)
    answers: list[object] = []
    try:
        os.kill(worker.pid, signal.SIGSTOP)  # takes nothing now: the job waits
        with serving(own, tmp_path / "serve.log") as base:
            head = audit_store.head().seq if audit_store.head() else 0

            def ask() -> None:
                try:
                    answers.append(httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]),
                                              timeout=120, json={"model": TINY_MODEL_NAME, "prompt": "Tell",
                                                                 "max_tokens": 200, "temperature": 0}))
                except httpx.HTTPError as exc:  # its gateway died: the connection closed, no answer
                    answers.append(exc)

            asking = threading.Thread(target=ask)
            asking.start()
            request_id = _newest_request(audit_store, head)
            _queued(client)
            base.process.kill()  # SIGKILL: no drain, its job stays queued
            base.process.wait(10)
            asking.join(30)
        time.sleep(GATEWAY_BEAT_TTL_S + 1)  # its last beat's time runs out
        os.kill(worker.pid, signal.SIGCONT)
        terminal = wait_terminal(audit_store, request_id)
        assert terminal.kind == "cancelled" and terminal.body["error"]["code"] == GATEWAY_GONE, terminal.body
        assert terminal.payload["output"] == "" and terminal.body["timings"]["queue_ms"] > GATEWAY_BEAT_TTL_S * 1000
        assert "usage" not in terminal.body or terminal.body["usage"].get("completion_tokens", 0) == 0
        assert "its gateway is gone; cancelled, not generated" in (tmp_path / "worker.log").read_text()
        # published to no one: named for any gateway to settle (its reservation given back)
        deadline = time.monotonic() + 10
        while request_id.encode() not in client.lrange(UNSETTLED_KEY, 0, -1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert request_id.encode() in client.lrange(UNSETTLED_KEY, 0, -1)
        assert len(answers) == 1 and isinstance(answers[0], httpx.HTTPError)  # its client got no answer
    finally:
        client.close()
