"""A Redis that fills up while a job is on its way: the request still ends once, and nothing waits for ever.

A Redis, a tiny-model worker and a served gateway of their own. The worker
is held (SIGSTOP) while the request is queued, Redis is then made to refuse
writes (``maxmemory`` below what it holds, under ``noeviction``: what a full
production Redis does), and the worker let go: its start claim (a ``SET``)
is refused. Readiness says so meanwhile, and once Redis has room again the
worker serves the next request and the first keeps its one terminal entry
(the task's failure was acknowledged; its redelivery bookkeeping had been
refused too).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from pathlib import Path

import httpx
import redis

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import pool_children
from tests.e2e.test_lost_report import queued, signal_all, wait_until
from workers.contract.registry import TINY_MODEL_NAME

REQUEST_TIMEOUT_S = 60.0


def test_a_job_whose_worker_finds_redis_full_ends_once_with_a_clear_error(settings, keyring, audit_store,
                                                                           tmp_path):
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-fr-"))
    server = RedisProcess.start(redis_dir, persist=False)
    own = settings.with_(redis_url=server.url, request_timeout_s=REQUEST_TIMEOUT_S)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    client = redis.Redis.from_url(server.url)
    outcome: dict = {}
    try:
        # The gateway is not started beside the worker here (as in the other served tests): the worker is frozen
        # below, and with the gateway started beside it, under a CPU burner, it once never ran the job (no
        # worker_error; the client's 30 s ran out): frozen right after it answered the ping, it seems not to
        # have been waiting in its blocking pop yet, so its take came only once Redis was full.
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        with serving(own, tmp_path / "serve.log") as base:
            def ask() -> None:
                try:
                    outcome["response"] = httpx.post(
                        f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=REQUEST_TIMEOUT_S / 2,
                        json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4})
                except httpx.HTTPError as exc:
                    outcome["error"] = exc

            held = [worker.pid, *pool_children(worker.pid)]
            asker = threading.Thread(target=ask)
            signal_all(held, signal.SIGSTOP)
            try:
                asker.start()
                wait_until(lambda: queued(client), "the job was never queued")
                client.config_set("maxmemory", "1")
            finally:
                signal_all(held, signal.SIGCONT)
            asker.join(REQUEST_TIMEOUT_S)
            ready_while_full = httpx.get(f"{base}/readyz", timeout=10)
            client.config_set("maxmemory", "0")
            request_id = outcome["response"].headers["x-govgate-request-id"] if "response" in outcome else None
            # Room again: the worker serves the next request, and the first one is not run again.
            after = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=30,
                               json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4})
    finally:
        client.close()
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    assert "error" not in outcome, outcome  # answered, not left to the client's timeout
    response = outcome["response"]
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "worker_error"
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed"], [(e.kind, e.body) for e in entries]
    # The worker's claim was refused; its failure, published (PUBLISH is allowed when Redis is full), names it.
    assert entries[1].body["error"]["code"] == "worker_error"
    assert entries[1].body["error"]["message"].startswith("OutOfMemoryError: "), entries[1].body
    assert ready_while_full.status_code == 503
    assert ready_while_full.json()["checks"]["redis"].startswith("error: refuses writes: OutOfMemoryError")
    assert after.status_code == 200, after.text
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "failed"]
