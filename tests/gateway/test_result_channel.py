"""Outcomes on the gateway's own reply channel (real Redis): right request, missed publishes, failures.

Workers publish a job's outcome and its stream pieces on the reply channel
of the gateway process that queued it, tagged with the request id, and store
the outcome under a short-lived key (``workers.replies``); the gateway's one
subscription resolves the matching wait (``gateway.dispatch.results``). See
docs/architecture.md, "The request path".
"""

from __future__ import annotations

import os

import pytest
import redis
import redis.asyncio as aioredis

from gateway.dispatch import ResultTimeout, ResultWaiter
from workers.contract.jobs import STATUS_COMPLETED, JobResult, result_key
from workers.contract.sealing import Sealer
from workers.replies import deliver, failure, success
from workers.streams import RedisJobChannel

pytestmark = pytest.mark.anyio


@pytest.fixture
async def waiter(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    waiter = ResultWaiter(client, Sealer(os.urandom(32)))
    await waiter.start()
    try:
        yield waiter
    finally:
        await waiter.aclose()
        await client.aclose()


@pytest.fixture
def worker_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def _sealed(waiter: ResultWaiter, text: str) -> dict:
    return JobResult(status=STATUS_COMPLETED, text=text, audit_seq=1).sealed(waiter._sealer)


async def test_an_outcome_reaches_the_request_it_names_and_no_other(waiter, worker_redis):
    async with waiter.expect("rc-a") as a, waiter.expect("rc-b") as b:
        assert deliver(worker_redis, "rc-a", waiter.reply_channel, success(_sealed(waiter, "for a")))
        meta = await a.get(5)
        assert meta["status"] == "SUCCESS"
        assert meta["result"]["text"] == "for a"
        with pytest.raises(ResultTimeout):
            await b.get(0.3)
    # Stored once, sealed: the text is not readable in Redis.
    stored = worker_redis.get(result_key("rc-a"))
    assert stored is not None and b"for a" not in stored
    assert 0 < worker_redis.ttl(result_key("rc-a")) <= 600


async def test_stream_pieces_arrive_before_the_outcome_of_their_request(waiter, worker_redis):
    channel = RedisJobChannel(worker_redis, "rc-s", streaming=True, sealer=waiter._sealer,
                              reply_to=waiter.reply_channel, flush_interval_s=0)
    other = RedisJobChannel(worker_redis, "rc-other", streaming=True, sealer=waiter._sealer,
                            reply_to=waiter.reply_channel, flush_interval_s=0)
    async with waiter.expect("rc-s", stream=True) as pending:
        channel.publish("Hel")
        other.publish("not mine")
        channel.publish("lo")
        deliver(worker_redis, "rc-s", waiter.reply_channel, success(_sealed(waiter, "Hello")))
        events = [event async for event in pending.events(5)]
    channel.forget()
    other.forget()
    assert events[:2] == ["Hel", "lo"]
    assert len(events) == 3 and events[2]["result"]["text"] == "Hello"


async def test_an_outcome_published_while_the_subscription_was_down_is_read_from_its_key(waiter, worker_redis):
    async with waiter.expect("rc-missed") as pending:
        # Stored but never heard: as if published while the gateway's pub/sub connection was gone.
        deliver(worker_redis, "rc-missed", "", success(_sealed(waiter, "recovered")))
        with pytest.raises(ResultTimeout):
            await pending.get(0.3)
        killed = worker_redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        meta = await pending.get(10)
    assert meta["result"]["text"] == "recovered"
    # The waiter still hears publishes after the reconnect.
    async with waiter.expect("rc-after") as pending:
        deliver(worker_redis, "rc-after", waiter.reply_channel, success(_sealed(waiter, "live")))
        assert (await pending.get(5))["result"]["text"] == "live"


async def test_a_task_that_raised_ends_the_wait_as_a_failure(waiter, worker_redis):
    async with waiter.expect("rc-raised") as pending:
        deliver(worker_redis, "rc-raised", waiter.reply_channel, failure(ValueError("job for another model")))
        meta = await pending.get(5)
    assert meta == {"status": "FAILURE", "result": {"exc_type": "ValueError",
                                                    "exc_message": "job for another model"}}


async def test_a_late_wait_reads_the_stored_outcome(waiter, worker_redis):
    deliver(worker_redis, "rc-late", waiter.reply_channel, success(_sealed(waiter, "earlier")))
    async with waiter.expect("rc-late") as pending:
        meta = await pending.get(5, look_stored=True)
    assert meta["result"]["text"] == "earlier"
