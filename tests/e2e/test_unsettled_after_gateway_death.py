"""Jobs that outlive their gateway: each ends once, and its usage is settled by the gateway that follows.

A gateway killed while its requests wait in the queue leaves the jobs there
(they survive, and a worker runs them), but it was the one to settle their
reservations: before, their in-flight slots stayed taken for 15 minutes (a
principal with ``in_flight: 8`` could run two more after six were lost) and
each one's prompt + ``max_tokens`` stayed charged to the day and the month.
Now whoever records such an end names the request, and any gateway settles
it from its terminal entry (``gateway/requests/unsettled.py``).

Real parts: ``govgate serve`` killed with SIGKILL, a second one started, a
worker, on a Redis of the test's own, under the shipped output rules (a
non-streamed output is handed over to a gateway that is gone, so its
fallback entry ends it; a stream's worker waits for a verdict nobody sends).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from gateway.limits.charge import used_tokens
from govgate.processes import stop_process
from tests.conftest import bearer, policy_copy, serving, spawn_cli, wait_for_worker
from tests.e2e.test_terminal_recovery import wait_terminals
from tests.gateway.test_fail_closed import queued
from tests.keys_and_limits import limits_for, new_key
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
JOBS = 4
MAX_TOKENS = 40


async def _usage(url: str, principal: str, team: str) -> dict:
    client = aioredis.Redis.from_url(url)
    try:
        return await UsageCounters(client).snapshot(principal, team)
    finally:
        await client.aclose()


def test_jobs_queued_when_their_gateway_dies_end_once_and_their_usage_is_settled(own_redis, audit_store,  # noqa: F811
                                                                                  tmp_path) -> None:
    user, team = f"orphan-{os.urandom(3).hex()}", "orphans"
    # The handed-over outputs' fallbacks are written by a retry once due (the worker's, or the new gateway's):
    # each looks every 0.2 s (GOVGATE_TERMINAL_RETRY_INTERVAL_S) rather than every 5 s, which the test waited out.
    own = own_redis.with_(queue_mode="fair", request_timeout_s=120, output_verdict_timeout_s=2,
                          terminal_retry_interval_s=0.2,
                          policy_dir=policy_copy(tmp_path, limits_for(
                              "principal", user, requests_per_minute=1000, tokens_per_minute=10**9,
                              tokens_per_day=10**9, in_flight=JOBS)))
    key = new_key(own, user, team)
    ids: list[str] = []

    def ask(base: str, stream: bool) -> None:
        try:
            with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=60,
                              json={"model": MODEL, "prompt": "Count", "max_tokens": MAX_TOKENS,
                                    "stop": [" "], "stream": stream}) as response:
                ids.append(response.headers["x-govgate-request-id"])
                response.read()
        except httpx.HTTPError:
            pass  # the gateway is killed under it

    with serving(own, tmp_path / "serve-1.log") as base:
        clients = [threading.Thread(target=ask, args=(base, i % 2 == 0)) for i in range(JOBS)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30
        while queued(own, MODEL) < JOBS:
            assert time.monotonic() < deadline, "the requests were never queued"
            time.sleep(0.05)
        base.process.kill()
        base.process.wait()
    for thread in clients:
        thread.join(30)
    held = asyncio.run(_usage(own.redis_url, user, team))["principal"]
    assert held["in_flight"] == JOBS and queued(own, MODEL) == JOBS  # the jobs survive, still reserved

    requests = [e.request_id for e in audit_store.tail(100) if e.principal == user and e.kind == "request"]
    assert len(requests) == JOBS
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve-2.log"):
            wait_for_worker(own.redis_url, MODEL, worker)
            ends = wait_terminals(audit_store, requests, timeout_s=120)
            assert len(ends) == JOBS, f"only {len(ends)} of {JOBS} jobs ended"
            deadline = time.monotonic() + 60
            while (usage := asyncio.run(_usage(own.redis_url, user, team))["principal"])["in_flight"]:
                assert time.monotonic() < deadline, f"the lost gateway's reservations were never settled: {usage}"
                time.sleep(0.2)
    finally:
        stop_process(worker, timeout_s=30)
    for request_id in requests:  # each ended exactly once
        assert [e.kind for e in audit_store.entries_for(request_id)][0] == "request"
        assert len(audit_store.entries_for(request_id)) == 2
    # charged what the terminal entries record, not the reservations (prompt + max_tokens each)
    recorded = sum(used_tokens(audit_store.terminal_for(r).body.get("usage")) for r in requests)
    assert usage["tokens_today"] == recorded < held["tokens_today"]
