"""A client that goes away while its job waits in the queue frees its place and its in-flight slot at once,
on a served gateway, and its request ends exactly once (``cancelled``).

Before, the job stayed in its list until a worker reached it (a non-streamed
request's client leaving was not even noticed, and its job was generated for
nobody): with a long queue, or none serving it, a principal whose client had
timed out found its in-flight slots taken by requests nobody waited for.
``govgate serve`` on a Redis of the test's own with no worker, so every job
waits; a worker started at the end shows the withdrawn jobs are never run.
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from govgate.processes import stop_process
from tests.conftest import bearer, policy_copy, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import wait_for_a_generation
from tests.e2e.test_terminal_recovery import wait_terminals
from tests.gateway.test_fail_closed import queued
from tests.keys_and_limits import limits_for, new_key
from tests.ops.metrics_text import samples, value
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.fair_queues import waiting_key
from workers.contract.output_check import verdict_key
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
IN_FLIGHT = 4
#: The analysts' prompt_logging in each mode's run: both levels' ends of a request gone while queued.
LOGGING = {"fair": "full", "fifo": "hash"}


async def in_flight_of(url: str, principal: str, team: str) -> tuple[int, int]:
    """The principal's and its team's requests in flight, as the gateway's counters read them."""
    client = aioredis.Redis.from_url(url)
    try:
        usage = await UsageCounters(client).snapshot(principal, team)
    finally:
        await client.aclose()
    return usage["principal"]["in_flight"], usage["team"]["in_flight"]


async def _until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["fair", "fifo"])
def test_clients_that_leave_while_queued_free_their_places_and_slots_and_end_once(
        own_redis, audit_store, tmp_path, mode) -> None:  # noqa: F811
    user, team = f"leaver-{os.urandom(3).hex()}", f"leavers-{mode}"
    limits = limits_for("principal", user, requests_per_minute=1000, tokens_per_minute=10**9, in_flight=IN_FLIGHT)
    logging = LOGGING[mode]

    def change(config: dict) -> None:
        limits(config)
        config["roles"]["analyst"]["prompt_logging"] = logging

    own = own_redis.with_(queue_mode=mode, request_timeout_s=120, policy_dir=policy_copy(tmp_path, change))
    key = new_key(own, user, team)
    ids: list[str] = []
    seen: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            async def ask(stream: bool) -> None:
                body = {"model": MODEL, "prompt": "Count", "max_tokens": 20, "stream": stream}
                async with client.stream("POST", f"{base}/v1/completions", headers=bearer(key), json=body) as r:
                    ids.append(r.headers["x-govgate-request-id"])  # a stream's head comes before its job runs
                    await r.aread()

            async def full() -> bool:
                return await in_flight_of(own.redis_url, user, team) == (IN_FLIGHT, IN_FLIGHT) \
                    and queued(own, MODEL) == IN_FLIGHT

            leavers = [asyncio.create_task(ask(i % 2 == 0)) for i in range(IN_FLIGHT)]  # streams and not
            await _until(full, "the requests to be queued")
            seen["refused"] = await client.post(f"{base}/v1/completions", headers=bearer(key),
                                                json={"model": MODEL, "prompt": "Count", "max_tokens": 20})
            for task in leavers:
                task.cancel()
            await asyncio.gather(*leavers, return_exceptions=True)

            async def freed() -> bool:
                return await in_flight_of(own.redis_url, user, team) == (0, 0) and queued(own, MODEL) == 0

            await _until(freed, "the places and slots of the clients that left to be freed")
            raw = redis.Redis.from_url(own.redis_url)
            seen["waiting"] = raw.hgetall(waiting_key(MODEL))
            seen["verdicts"] = raw.keys(verdict_key("*"))
            raw.close()

    with serving(own, tmp_path / "serve.log") as base:
        asyncio.run(scenario(base))
        # the jobs taken back unstarted are observed apart (the worker-measured wait histogram never sees them)
        scraped = httpx.get(f"{base}/metrics", headers=bearer(new_key(own, "metrics-reader", None, ("admin",))))
        withdrawn = value(samples(scraped.text), "govgate_queue_withdrawn_wait_seconds_count", model=MODEL)
        worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
        try:
            wait_for_worker(own.redis_url, MODEL, worker)
            served = httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=120,
                                json={"model": MODEL, "prompt": "Count", "max_tokens": 2})
        finally:
            stop_process(worker, timeout_s=30)

    refused = seen["refused"]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_in_flight", refused.text
    assert not seen["waiting"]  # the team's waiting count went down with its jobs (fair mode)
    # a stream's cancelled verdict, sent as its client left, is taken back with its job: no worker reads it
    assert not seen["verdicts"]
    assert withdrawn == IN_FLIGHT, scraped.text[-2000:]
    assert served.status_code == 200, served.text
    assert asyncio.run(in_flight_of(own.redis_url, user, team)) == (0, 0)
    # every request that left: its request entry and exactly one terminal entry, cancelled, none run
    others = {r.headers["x-govgate-request-id"] for r in (refused, served)}
    gone = {e.request_id for e in audit_store.tail(200)
            if e.principal == user and e.kind == "request" and e.request_id not in others}
    assert len(gone) == IN_FLIGHT and set(ids) <= gone
    for request_id in gone:
        entries = audit_store.entries_for(request_id)
        assert [e.kind for e in entries] == ["request", "cancelled"], [(e.kind, e.body) for e in entries]
        assert entries[1].body["error"]["code"] == "cancelled"
        # kept as the request's prompt_logging keeps an output: under hash no payload, a digest and a length
        # (it was {"output": ""} in a payload whatever the level)
        if logging == "hash":
            assert entries[1].payload is None and entries[1].body["output_chars"] == 0, entries[1]
        else:
            assert entries[1].payload is not None and entries[1].payload.get("output") == ""
    assert "Task govgate.generate" not in "".join(
        line for line in (tmp_path / "worker.log").read_text().splitlines(True)
        if any(request_id in line for request_id in gone))


def test_a_non_streamed_client_that_leaves_mid_generation_stops_it(own_redis, audit_store, tmp_path) -> None:  # noqa: F811
    """Its worker sees the cancel key as for a stream: the generation stops, the end is ``cancelled`` with
    what was generated (charged), and the slot is free; before, the whole completion was generated for
    nobody, and charged."""
    user, team = f"quitter-{os.urandom(3).hex()}", "quitters"
    own = own_redis.with_(queue_mode="fair", request_timeout_s=120)
    key = new_key(own, user, team, roles=("admin",))  # the admin role's max_tokens: a long generation
    found: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(client.post(
                f"{base}/v1/completions", headers=bearer(key),
                json={"model": MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0}))
            found["request_id"] = await asyncio.to_thread(wait_for_a_generation, own.redis_url)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, MODEL, worker)
            asyncio.run(scenario(base))
            request_id = found["request_id"]
            assert request_id is not None, "the generation was never seen starting"
            wait_terminals(audit_store, [request_id], timeout_s=60)
            asyncio.run(_until(lambda: _settled(own.redis_url, user, team), "the slot to be freed"))
    finally:
        stop_process(worker, timeout_s=30)
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "cancelled"], [(e.kind, e.body.get("error")) for e in entries]
    assert 0 < entries[1].body["usage"]["completion_tokens"] < 4000


async def _settled(url: str, principal: str, team: str) -> bool:
    return await in_flight_of(url, principal, team) == (0, 0)
