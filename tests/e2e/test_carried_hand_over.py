"""A solo worker whose take, carrying a job's hand-over, fails in its script: the request still ends once.

A Redis, a tiny-model worker (the solo pool, the default, with
``GOVGATE_HANDOVER_ON_TAKE`` on) and a served gateway of their own. The pending terminals' key is made a string, so the hand-over's
``HSETNX`` fails (WRONGTYPE) wherever it runs: in the take the ack sends
(``workers/contract/take.py``: the script stops there, before anything else
ran) and again when the worker sends it on its own. The job's output was kept
until the take's reply, so the worker records it ``output_unchecked`` itself
and delivers that end: the client gets a clear error at once, not the
gateway's timeout, and the request has one terminal entry. Once the key is
fixed the worker serves on, its hand-overs riding on its takes again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import redis

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.registry import TINY_MODEL_NAME

#: Long enough that an answer in time can only come from the worker's own end of the request.
REQUEST_TIMEOUT_S = 120.0


def test_a_hand_over_its_take_and_redis_refuse_is_recorded_unchecked_once_and_answered(
        settings, keyring, audit_store, tmp_path):
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-cho-"))
    server = RedisProcess.start(redis_dir, persist=False)
    own = settings.with_(redis_url=server.url, request_timeout_s=REQUEST_TIMEOUT_S,
                         output_verdict_timeout_s=REQUEST_TIMEOUT_S, handover_on_take=True)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    client = redis.Redis.from_url(server.url)
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            def ask() -> httpx.Response:
                return httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]),
                                  timeout=REQUEST_TIMEOUT_S / 2,
                                  json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4})

            assert ask().status_code == 200  # a hand-over that rode on a take
            client.set(PENDING_KEY, "not a hash")
            refused = ask()
            client.delete(PENDING_KEY)
            after = ask()
        log = (tmp_path / "worker.log").read_text()
    finally:
        client.close()
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    assert refused.status_code != 200 and refused.json()["error"]["code"] == "output_unchecked", refused.text
    request_id = refused.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed"]
    assert entries[1].body["error"]["code"] == "output_unchecked"
    assert "failed: handing it over on its own" in log and "cannot hand the output of" in log
    assert after.status_code == 200, after.text
    assert [e.kind for e in audit_store.entries_for(after.headers["x-govgate-request-id"])] == [
        "request", "completion"]
