"""The ``too_many_in_flight`` 429's Retry-After: when one of the scope's requests in flight should end.

Before, it was a flat second: a principal whose requests waited behind a long
queue was told to come back at once, and refused again at each retry. The
estimate (gateway/limits/in_flight_wait.py) against a real Redis holding the
scope's slots, its jobs' state keys and the model's queue, workers and mean
service time; then on a served gateway, whose policy says 1 s.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import uuid

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from gateway.limits import Scope, UsageCounters
from gateway.limits.in_flight_wait import in_flight_wait_s, soonest_end_s
from tests.conftest import bearer, policy_copy, serving
from tests.e2e.test_queued_disconnect import _until, in_flight_of
from tests.gateway.test_fail_closed import queued
from tests.gateway.test_usage_counters import client  # noqa: F401  (fixture: an async client of the session's Redis)
from tests.keys_and_limits import limits_for, new_key
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.fair_queues import MODE_FAIR, MODE_FIFO, tags_key, team_field, waiting_key
from workers.contract.jobs import JOB_STARTED, cancel_key, queue_for
from workers.contract.liveness import WORKERS_KEY, member
from workers.contract.queue_layout import queue_keys
from workers.contract.registry import TINY_MODEL_NAME

T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))
ALL_IN_FLIGHT = {"principal": {"in_flight": 2}, "team": None}


@pytest.fixture
def model() -> str:
    return f"wait-{uuid.uuid4().hex[:8]}"


async def hold(counters: UsageCounters, principal: str, n: int, at: float) -> list[str]:
    ids = [uuid.uuid4().hex for _ in range(n)]
    for request_id in ids:
        await counters.reserve(request_id, principal, None, ALL_IN_FLIGHT, 10, now=at)
    return ids


async def model_state(client: aioredis.Redis, model: str, *, svc_ms: float, live: int, waiting: int) -> None:
    await client.hset(tags_key(model), mapping={"svc": svc_ms})
    for i in range(live):
        await client.zadd(WORKERS_KEY, {member(model, f"w{i}"): T + 3600})
    if waiting:
        await client.lpush(queue_keys(queue_for(model))[0], *[f"job{i}" for i in range(waiting)])


@pytest.mark.anyio
async def test_the_estimate_follows_the_queue_the_service_time_and_started_jobs(client, model) -> None:
    principal = f"p-{uuid.uuid4().hex[:8]}"
    counters = UsageCounters(client, prefix=f"test:{uuid.uuid4().hex}")
    scope = Scope("principal", principal)

    async def wait(timeout_s: float = 120, now: float = T + 1, mode: str = MODE_FIFO) -> int:
        return await in_flight_wait_s(client, counters, scope, model, queue_mode=mode, timeout_s=timeout_s,
                                      now=now)

    assert await wait() == 1  # nothing in flight (any more): nothing to estimate
    first, second = await hold(counters, principal, 2, T)
    # both wait among 7 jobs (5 of others ahead at most), one live worker at 2 s a job: 5 × 2 + 2
    await model_state(client, model, svc_ms=2000, live=1, waiting=7)
    assert await wait() == 12
    await model_state(client, model, svc_ms=2000, live=2, waiting=0)  # a second worker: 5 / 2 × 2 + 2
    assert await wait() == 7
    assert await wait(timeout_s=4) == 3  # admitted at T, so at T + 1 the request has 3 s before its timeout
    assert await wait(timeout_s=4, now=T + 10) == 1  # past it (the 504 is due): never 0
    await client.set(cancel_key(second), JOB_STARTED)  # one runs: it ends in about one service time
    assert await wait() == 2
    # fair mode reads the model's waiting hash, not the lists
    await client.hset(waiting_key(model), mapping={team_field("a"): 4, team_field("b"): 3})
    await client.delete(cancel_key(second))
    await client.delete(*queue_keys(queue_for(model)))
    assert await wait(mode=MODE_FAIR) == 7
    await client.delete(waiting_key(model), tags_key(model), cancel_key(first))
    # Redis gone: the refusal still answers, with the old second
    broken = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    assert await in_flight_wait_s(broken, UsageCounters(broken), scope, model, queue_mode=MODE_FIFO,
                                  timeout_s=120, now=T + 1) == 1
    await broken.aclose()


def test_the_arithmetic_is_bounded_and_whole() -> None:
    assert soonest_end_s([], 10, 1000, 1, 120, T) == 1
    assert soonest_end_s([(False, T)], 1, 1500, 0, 120, T) == 2  # nothing ahead, no worker yet: 1.5 s, up
    assert soonest_end_s([(False, T)], 1000, 1000, 1, 120, T) == 120  # never past the request's timeout
    assert soonest_end_s([(True, T), (False, T)], 50, 3000, 1, 120, T) == 3


def test_a_served_gateway_tells_a_principal_at_its_in_flight_limit_when_to_come_back(
        own_redis, tmp_path) -> None:  # noqa: F811
    """The policy says 1 s; the 429 says when the waiting request should end: no worker yet, nothing ahead of
    it, the model's mean service time 20 s, so about 20 s (a retry after 1 s would only be refused again)."""
    user, team = f"waiter-{os.urandom(3).hex()}", "waiters"
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=120, policy_dir=policy_copy(
        tmp_path, limits_for("principal", user, requests_per_minute=1000, tokens_per_minute=10**9, in_flight=1)))
    key = new_key(own, user, team)
    model = TINY_MODEL_NAME
    raw = redis.Redis.from_url(own.redis_url)
    raw.hset(tags_key(model), "svc", 20000)
    seen: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": model, "prompt": "Count", "max_tokens": 5}
            waiting = asyncio.create_task(http.post(f"{base}/v1/completions", headers=bearer(key), json=body))

            async def held() -> bool:
                return (await in_flight_of(own.redis_url, user, team))[0] == 1 and queued(own, model) == 1

            await _until(held, "the first request to be queued")
            seen["refused"] = await http.post(f"{base}/v1/completions", headers=bearer(key), json=body)
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)

            async def freed() -> bool:
                return (await in_flight_of(own.redis_url, user, team))[0] == 0

            await _until(freed, "the queued request's slot to be freed")

    try:
        with serving(own, tmp_path / "serve.log") as base:
            asyncio.run(scenario(base))
    finally:
        raw.hdel(tags_key(model), "svc")
        raw.close()
    refused = seen["refused"]
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_many_in_flight"
    retry = int(refused.headers["Retry-After"])
    assert retry == 20, refused.headers
    assert [r["retry_after_s"] for r in error["reasons"]] == [20]
