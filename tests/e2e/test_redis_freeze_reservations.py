"""Requests refused while Redis is frozen hold no in-flight slot once it resumes, on a served gateway.

Redis stopped (SIGSTOP) past the gateway's Redis timeout (2 s here): each
completion is refused 503 ``usage_unavailable``, but its admission script,
with the reservation made ahead of the decision, is already in the frozen
Redis's socket and runs when Redis resumes. Before, nothing gave it back: a
principal with ``in_flight`` 2 got 429 ``too_many_in_flight`` for the
in-flight TTL (15 minutes) after a 20 s outage (findings h3, F2). Now the
gateway gives back, in the background, what a reserving call that got no
answer took. ``govgate serve`` on a Redis of the test's own, no worker: an
admitted stream's head comes before its job runs, and its client leaving
frees its slot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from tests.conftest import bearer, policy_copy, serving
from tests.e2e.test_queued_disconnect import in_flight_of
from tests.keys_and_limits import limits_for, new_key
from tests.own_redis import doomed_redis  # noqa: F401 - fixture
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
BODY = {"model": MODEL, "prompt": "Count", "max_tokens": 8}


async def _admitted_stream(client: httpx.AsyncClient, base: str, key: str) -> int:
    """A stream's status once its head came; its client then leaves (the job, never run, is withdrawn)."""
    async with client.stream("POST", f"{base}/v1/completions", headers=bearer(key),
                             json={**BODY, "stream": True}) as response:
        return response.status_code


def test_requests_refused_during_a_redis_freeze_hold_no_slot_after_it(settings, doomed_redis, tmp_path) -> None:  # noqa: F811
    user, team = f"frozen-{os.urandom(3).hex()}", f"frozen-team-{os.urandom(3).hex()}"
    own = settings.with_(redis_url=doomed_redis.url, queue_mode="fair", request_timeout_s=120, redis_timeout_s=2,
                         policy_dir=policy_copy(tmp_path, limits_for("principal", user, requests_per_minute=1000,
                                                                     tokens_per_minute=10**9, in_flight=2)))
    key = new_key(own, user, team)
    seen: dict = {}

    async def until_free(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while await in_flight_of(own.redis_url, user, team) != (0, 0):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            # an allowed request first: the gateway now knows the limits it reserves against with the snapshot
            seen["first"] = await _admitted_stream(client, base, key)
            assert await until_free(30), "the first stream's slot was not freed"
            os.kill(doomed_redis.process.pid, signal.SIGSTOP)
            try:
                seen["during"] = [await client.post(f"{base}/v1/completions", headers=bearer(key), json=BODY)
                                  for _ in range(2)]
            finally:
                os.kill(doomed_redis.process.pid, signal.SIGCONT)
            seen["freed"] = await until_free(60)
            seen["in_flight"] = await in_flight_of(own.redis_url, user, team)
            seen["after"] = await _admitted_stream(client, base, key)

    with serving(own, tmp_path / "serve.log") as base:
        asyncio.run(scenario(base))

    assert seen["first"] == 200
    for response in seen["during"]:
        assert response.status_code == 503 and response.json()["error"]["code"] == "usage_unavailable", response.text
    assert seen["freed"], f"slots still taken after Redis resumed: {seen['in_flight']}"
    assert seen["after"] == 200
