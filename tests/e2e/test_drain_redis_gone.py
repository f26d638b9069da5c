"""A stop that takes Redis down with the gateway: a queued request its drain told "cancelled" is never run later.

A systemd stop (SIGTERM to every process of the stack at once) or a SIGKILLed
``govgate up`` stops Redis as the API drains. The drain still answered a queued
non-streamed request 503 ``shutting_down`` ("the request was cancelled"), but it
could neither take the job back nor flag it (Redis was gone), and recorded no
end: the request stayed a ``request`` entry alone, and its job, kept in Redis's
append-only file, was generated in full and charged when the stack started again
(probe p1 F1). Now the gateway records the end itself (``cancelled``, in the
database, which is still up), and the worker that takes the job later finds that
end and does not generate.

Real parts: a Redis of the test's own with its append-only file (stopped and
started again on the same folder), ``govgate serve`` drained by SIGTERM, a worker
started only after the restart (so the job stays queued until then), the suite's
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from audit import AuditStore, make_engine
from tests.conftest import bearer, policy_copy, serving, spawn_cli, wait_for_worker
from tests.e2e.test_terminal_recovery import locked
from tests.gateway.test_fail_closed import queued
from tests.keys_and_limits import limits_for, new_key
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME


@pytest.fixture
def lasting_redis():
    """A Redis of the test's own that keeps its data in an append-only file, as ``govgate up``'s does: the
    test stops it and starts it again on the same folder (:func:`_restart`)."""
    folder = Path(tempfile.mkdtemp(prefix="gg-rg-"))
    servers = [RedisProcess.start(folder, persist=True)]
    yield folder, servers
    for server in servers:
        if server.process.poll() is None:
            server.stop()
    shutil.rmtree(folder, ignore_errors=True)


async def _usage(url: str, principal: str, team: str) -> dict:
    client = aioredis.Redis.from_url(url)
    try:
        return (await UsageCounters(client).snapshot(principal, team))["principal"]
    finally:
        await client.aclose()


def _cut_with_redis_gone(own, key: str, server: RedisProcess, log: Path,
                         during: Callable[[], ContextManager[object]] = contextlib.nullcontext,
                         stream: bool = False) -> httpx.Response:
    """Queue a request (no worker serves the model), stop Redis, then the gateway (``during`` that block,
    e.g. with the database locked); the answer its drain gave (a stream's, read to its end)."""
    with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
        asked = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(key), timeout=120,
                            json={"model": MODEL, "prompt": "Count", "max_tokens": 40, "stream": stream})
        deadline = time.monotonic() + 60
        while queued(own, MODEL) < 1:  # no worker serves the model yet: the job waits in the queue
            assert time.monotonic() < deadline, "the request was never queued"
            time.sleep(0.05)
        server.stop()  # Redis goes first (SIGTERM: it writes its append-only file and exits) ...
        with during():
            base.process.send_signal(signal.SIGTERM)  # ... then the gateway drains without it
            answered = asked.result(timeout=120)
        assert base.process.wait(timeout=90) is not None
    return answered


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "stream"])
def test_a_queued_request_cut_while_redis_is_gone_is_recorded_cancelled_and_never_run(
        settings, audit_store, lasting_redis, tmp_path, stream) -> None:
    """The non-streamed request is the probe's case; a stream was recorded ``cancelled`` already (its
    abandoned wait records the end), but its job still ran at the restart, its end lost at the constraint."""
    folder, servers = lasting_redis
    user, team = f"stopped-{os.urandom(3).hex()}", "stopped"
    own = settings.with_(redis_url=servers[0].url, drain_s=1.0, request_timeout_s=180, output_verdict_timeout_s=2,
                         terminal_retry_interval_s=0.2,
                         policy_dir=policy_copy(tmp_path, limits_for(
                             "principal", user, requests_per_minute=1000, tokens_per_minute=10**9,
                             tokens_per_day=10**9, in_flight=4)))
    key = new_key(own, user, team)

    answered = _cut_with_redis_gone(own, key, servers[0], tmp_path / "serve-1.log", stream=stream)
    if stream:  # an error event in place of the rest, no [DONE]
        assert answered.status_code == 200 and '"shutting_down"' in answered.text, answered.text
        assert "[DONE]" not in answered.text
    else:
        assert answered.status_code == 503, answered.text
        assert answered.json()["error"]["code"] == "shutting_down"
    request_id = answered.headers["x-govgate-request-id"]

    servers.append(RedisProcess.start(folder, persist=True))  # the stack starts again, well within the timeout
    assert queued(own, MODEL) == 1  # the job survived in the append-only file: a worker will take it
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve-2.log"):  # the gateway that settles what no gateway waited for
            wait_for_worker(own.redis_url, MODEL, worker)
            deadline = time.monotonic() + 120
            while True:  # the worker took the job, the request has its end, and its reservation was settled
                usage = asyncio.run(_usage(own.redis_url, user, team))
                ended = audit_store.terminal_for(request_id) is not None
                if ended and queued(own, MODEL) == 0 and not usage["in_flight"]:
                    break
                assert time.monotonic() < deadline, f"the job was never handled and settled: {usage}"
                time.sleep(0.2)
    finally:
        stop_process(worker, timeout_s=30)

    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "cancelled"], [(e.kind, e.body.get("error")) for e in entries]
    assert "gateway stopped" in entries[1].body["error"]["message"]
    assert not entries[1].body.get("usage")
    assert usage["tokens_today"] == 0, usage  # nothing charged: nothing was generated
    worker_log = (tmp_path / "worker.log").read_text()
    assert f"request {request_id} already ended as cancelled; not generating again" in worker_log


def test_a_cut_request_whose_end_cannot_be_recorded_either_is_not_said_to_be_cancelled(
        settings, lasting_redis, tmp_path) -> None:
    """Redis gone and the database refusing the entry too (locked past its busy timeout): nothing can stop
    the job once Redis is back, and the client is told so rather than "cancelled"."""
    _, servers = lasting_redis
    own = settings.with_(redis_url=servers[0].url, drain_s=1.0, request_timeout_s=180,
                         database_url=f"sqlite:///{tmp_path / 'own.db'}", database_busy_timeout_s=1.0)
    key = new_key(own, f"unrecorded-{os.urandom(3).hex()}", "stopped")
    answered = _cut_with_redis_gone(own, key, servers[0], tmp_path / "serve.log",
                                    during=lambda: locked(own.effective_database_url))
    assert answered.status_code == 503, answered.text
    error = answered.json()["error"]
    assert error["code"] == "shutting_down"
    assert "may still run" in error["message"] and "cancelled" not in error["message"], error
    audit = AuditStore(make_engine(own.effective_database_url))
    try:
        request_id = answered.headers["x-govgate-request-id"]
        assert [e.kind for e in audit.entries_for(request_id)] == ["request"]
    finally:
        audit.engine.dispose()
