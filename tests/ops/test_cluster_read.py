"""``read_cluster`` against a real Redis: what a scrape and a readiness probe learn in one round trip."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from gateway.observability.cluster import WRITE_PROBE_KEY, WRITE_PROBE_TTL_MS, read_cluster
from govgate.redis_server import RedisProcess
from workers.contract.fair_queues import waiting_key

pytestmark = pytest.mark.anyio

MODEL = "cluster-read-model"


@pytest.fixture
def own_redis(short_tmp):
    server = RedisProcess.start(short_tmp("gg-cr-"), persist=False)
    raw = redis.Redis.from_url(server.url)
    yield server, raw
    raw.close()
    server.stop()


async def read(url: str, **kwargs):
    client = aioredis.Redis.from_url(url)
    try:
        return await read_cluster(client, [MODEL], **kwargs)
    finally:
        await client.aclose()


async def test_a_scrape_writes_nothing_and_a_probe_writes_one_expiring_key(own_redis):
    server, raw = own_redis
    raw.hset(waiting_key(MODEL), mapping={"team-a": 2, "team-b": 3})
    scraped = await read(server.url)
    assert (scraped.error, scraped.write_refused, scraped.queued) == (None, None, {MODEL: 5})
    assert raw.exists(WRITE_PROBE_KEY) == 0
    probed = await read(server.url, probe_write=True)
    assert (probed.error, probed.write_refused, probed.queued) == (None, None, {MODEL: 5})
    assert 0 < raw.pttl(WRITE_PROBE_KEY) <= WRITE_PROBE_TTL_MS


async def test_a_full_redis_is_read_but_refuses_the_probe(own_redis):
    server, raw = own_redis
    raw.hset(waiting_key(MODEL), mapping={"team-a": 4})
    raw.config_set("maxmemory", "1")
    probed = await read(server.url, probe_write=True)
    assert probed.error is None and probed.queued == {MODEL: 4}
    assert probed.write_refused is not None and probed.write_refused.startswith("OutOfMemoryError: ")
    assert "maxmemory" in probed.write_refused


async def test_an_error_reply_to_a_read_is_a_failed_read(own_redis):
    server, raw = own_redis
    raw.set(waiting_key(MODEL), "not a hash")  # HVALS answers WRONGTYPE
    state = await read(server.url, probe_write=True)
    assert state.queued == {} and state.workers == {}
    assert state.error is not None and state.error.startswith("Redis: ResponseError: WRONGTYPE")
    assert state.write_refused is None  # the write itself went through
