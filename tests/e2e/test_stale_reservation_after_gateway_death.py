"""A gateway killed between reserving a request and recording it: the reservation is given back (probe s57 D2).

Before, nothing ever did: the principal's in-flight slot stayed taken for
15 minutes (its next requests got 429 ``too_many_in_flight``) and the
prompt and ``max_tokens`` stayed charged to the day and the month. No
request entry names such a request, so the lost-request sweep never saw it.

Real parts: ``govgate serve`` on a Redis and a SQLite database of the test's
own; the database's write lock is held (``BEGIN IMMEDIATE`` in another
connection) so that the request entry waits, and the gateway is killed
with SIGKILL while it does. The look that gives the reservation back is
the one a gateway runs (``gateway/requests/stale_reservations.py``), on the same
Redis and database, with its clock moved past the look's bar rather than
waiting the two minutes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time

import httpx
import redis
import redis.asyncio as aioredis

from audit import AuditStore
from gateway.db_setup import open_database
from gateway.limits import UsageCounters
from gateway.requests.stale_reservations import LOOK_LOCK_KEY, UNRECORDED, end_stale_reservations, stale_after_s
from tests.conftest import bearer, policy_copy, serving
from tests.keys_and_limits import limits_for, new_key
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.registry import TINY_MODEL_NAME


def _scopes(url: str, principal: str, team: str) -> list[dict]:
    async def read() -> list[dict]:
        client = aioredis.Redis.from_url(url)
        try:
            usage = await UsageCounters(client).snapshot(principal, team)
        finally:
            await client.aclose()
        return [{"in_flight": usage[s]["in_flight"], "tokens_today": usage[s]["tokens_today"]}
                for s in ("principal", "team")]
    return asyncio.run(read())


def _give_back(settings, audit: AuditStore) -> list:
    """One look as the gateway of ``settings`` makes it, its clock moved past its bar."""
    bar = stale_after_s(policy_wait_timeout_s=settings.policy_wait_timeout_s,
                        policy_timeout_s=settings.policy_timeout_s,
                        database_busy_timeout_s=settings.database_busy_timeout_s)

    async def look() -> list:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            counters = UsageCounters(client)
            assert await end_stale_reservations(counters, audit, now=time.time() + bar - 5, after_s=bar) == []
            return await end_stale_reservations(counters, audit, now=time.time() + bar + 5, after_s=bar)
        finally:
            await client.aclose()
    return asyncio.run(look())


def test_a_reservation_its_killed_gateway_never_recorded_is_given_back(own_redis, tmp_path) -> None:  # noqa: F811
    user, team = f"unrecorded-{os.urandom(3).hex()}", "unrecorded-team"
    database = tmp_path / "own.db"
    own = own_redis.with_(database_url=f"sqlite:///{database}", database_busy_timeout_s=120.0,
                          policy_dir=policy_copy(tmp_path, limits_for("principal", user, in_flight=1)))
    key = new_key(own, user, team)
    client = redis.Redis.from_url(own.redis_url)
    principal_hash = f"{{govgate:usage}}:p:{user}:h"

    def ask(base: str) -> None:
        try:
            httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=60,
                       json={"model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": 8})
        except httpx.HTTPError:
            pass  # the gateway is killed under it

    with serving(own, tmp_path / "serve.log") as base:
        deadline = time.monotonic() + 30
        while not client.exists(LOOK_LOCK_KEY):  # the gateway looks as it starts, and holds the look's lock
            assert time.monotonic() < deadline, "the gateway never looked for stale reservations"
            time.sleep(0.05)
        lock = sqlite3.connect(database, isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")  # the request entry waits for the database
        try:
            asker = threading.Thread(target=ask, args=(str(base),))
            asker.start()
            deadline = time.monotonic() + 30
            while not (records := [f for f in client.hkeys(principal_hash) if f.startswith(b"r:")]):
                assert time.monotonic() < deadline, "the request was never reserved"
                time.sleep(0.02)
            base.process.kill()
            base.process.wait()
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    asker.join(30)
    request_id = records[0][2:].decode()
    engine = open_database(own)
    try:
        audit = AuditStore(engine)
        assert audit.entries_for(request_id) == []  # never recorded
        held = [{"in_flight": 1, "tokens_today": s["tokens_today"]} for s in _scopes(own.redis_url, user, team)]
        assert _scopes(own.redis_url, user, team) == held and held[0]["tokens_today"] >= 8  # max_tokens at least
        given = _give_back(own, audit)
        assert [(kind, h.request_id, h.principal_key, h.team_key) for kind, h in given] == [
            (UNRECORDED, request_id, user, team)]
        assert _scopes(own.redis_url, user, team) == [{"in_flight": 0, "tokens_today": 0}] * 2
        assert audit.entries_for(request_id) == []  # nothing was written for it: it was never decided
    finally:
        engine.dispose()
        client.close()
