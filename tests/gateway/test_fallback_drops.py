"""Fallbacks of recorded outputs dropped in batches: one HDEL for many, sent off the path, nothing lost at close."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio as aioredis

from gateway.requests.fallback_drops import FallbackDrops
from tests.own_redis import doomed_redis  # noqa: F401 - fixture
from workers.contract.pending_terminals import PENDING_KEY

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(doomed_redis):
    """A Redis of the test's own (one test stops it)."""
    return doomed_redis


@pytest.fixture
def sync_client(server):
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def hdel_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hdel", {}).get("calls", 0))


async def until(check, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def test_the_requests_recorded_within_the_delay_share_one_hdel(server, sync_client):
    sync_client.hset(PENDING_KEY, mapping={"r1": b"x", "r2": b"x", "r3": b"x", "other": b"x"})
    client = aioredis.Redis.from_url(server.url)
    drops = FallbackDrops(client, delay_s=0.2)
    try:
        before = hdel_calls(sync_client)
        for request_id in ("r1", "r2", "r3"):
            drops.drop(request_id)
        assert sync_client.hlen(PENDING_KEY) == 4  # nothing sent on the request's path
        await until(lambda: sync_client.hlen(PENDING_KEY) == 1)
        assert sync_client.hkeys(PENDING_KEY) == [b"other"]
        assert hdel_calls(sync_client) - before == 1
        drops.drop("other")  # a later batch starts its own delay
        await until(lambda: sync_client.hlen(PENDING_KEY) == 0)
        assert hdel_calls(sync_client) - before == 2
    finally:
        await drops.aclose()
        await client.aclose()


async def test_closing_sends_what_waits_at_once(server, sync_client):
    sync_client.hset(PENDING_KEY, mapping={"r1": b"x", "r2": b"x"})
    client = aioredis.Redis.from_url(server.url)
    drops = FallbackDrops(client, delay_s=60)
    try:
        drops.drop("r1")
        drops.drop("r2")
        await drops.aclose()
        assert sync_client.hlen(PENDING_KEY) == 0
    finally:
        await client.aclose()


async def test_a_redis_that_refuses_is_logged_not_raised(server, sync_client, caplog):
    """A fallback that cannot be dropped stays; a retry meets the unique constraint and drops it then."""
    client = aioredis.Redis.from_url(server.url, socket_timeout=1)
    drops = FallbackDrops(client, delay_s=0.01)
    server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.requests.fallback_drops"):
            drops.drop("r1")
            drops.drop("r2")
            await until(lambda: "cannot drop the fallback entries of 2" in caplog.text)
            await drops.aclose()
    finally:
        await client.aclose()
