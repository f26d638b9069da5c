"""Jobs a Redis restarted empty lost are answered within seconds (real Redis, SIGKILLed and started again).

``gateway/dispatch/redis_epoch.py`` tells a Redis that lost its data from one
that only dropped the connection; ``gateway/dispatch/lost_jobs.py`` looks for
the unanswered waits' jobs there; ``workers/streams.py`` claims a job it is
generating again when the claim vanished, so that the look sees it running.
The end to end test (a served gateway, a worker, the client's 503) is
``tests/e2e/test_queue_lost.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis
import redis.asyncio as aioredis

import gateway.dispatch.results as results
from gateway.dispatch import ResultTimeout, ResultWaiter
from gateway.dispatch.lost_jobs import found, is_lost, lost_outcome
from gateway.dispatch.redis_epoch import EPOCH_KEY, RedisEpoch
from govgate.redis_server import RedisProcess
from workers.contract.jobs import JOB_STARTED, REPLY_PIECE, STOP_TIMED_OUT, cancel_key, reply_message, seal_piece
from workers.contract.sealing import Sealer
from workers.streams import RedisJobChannel

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))


async def _waiter_on_own_redis(redis_dir) -> tuple[RedisProcess, aioredis.Redis, ResultWaiter]:
    """A Redis of the test's own (no append-only file) and a started result waiter on it, as a gateway has."""
    server = RedisProcess.start(redis_dir, persist=False)
    client = aioredis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=5)
    waiter = ResultWaiter(client, SEALER)
    await waiter.start()
    return server, client, waiter


def _restart_empty(server: RedisProcess, redis_dir) -> RedisProcess:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    return RedisProcess.start(redis_dir, persist=False)


async def test_the_epoch_tells_data_lost_from_a_dropped_connection(short_tmp):
    redis_dir = short_tmp("gg-ep-")
    server = RedisProcess.start(redis_dir, persist=False)
    client = aioredis.Redis.from_url(server.url)
    try:
        first, second, unnoted = RedisEpoch(client), RedisEpoch(client), RedisEpoch(client)
        await first.note()
        await second.note()
        assert await client.get(EPOCH_KEY) is not None
        assert not await first.lost() and not await second.lost()  # nothing lost: the token the gateways saw
        await client.flushall()
        assert await first.lost()  # gone: the first to look writes a new token...
        assert await second.lost()  # ...which is not the one the other saw either
        assert not await first.lost() and not await second.lost()  # both adopted it
        assert not await unnoted.lost()  # never saw one: nothing to tell
        await client.set(EPOCH_KEY, "another")  # a failover to a Redis with another history
        assert await first.lost()
    finally:
        await client.aclose()
        server.stop()


async def test_a_job_is_found_in_its_list_or_by_its_start_claim(short_tmp):
    redis_dir = short_tmp("gg-lf-")
    server = RedisProcess.start(redis_dir, persist=False)
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.lpush("queue-a", "other", "msg-1")
        await client.set(cancel_key("begun"), JOB_STARTED)
        jobs = {"waiting": ("queue-a", "msg-1"), "begun": ("queue-a", "msg-2"), "gone": ("queue-a", "msg-3"),
                "elsewhere": ("queue-b", "msg-1")}
        assert await found(client, jobs) == {"waiting", "begun"}
        many = {f"r{i}": ("queue-a", "msg-1" if i % 3 == 0 else f"x{i}") for i in range(250)}  # three pages
        assert await found(client, many) == {f"r{i}" for i in range(0, 250, 3)}
    finally:
        await client.aclose()
        server.stop()


async def test_after_redis_came_back_empty_the_waits_whose_job_it_lost_are_answered_lost(short_tmp, monkeypatch,
                                                                                          caplog):
    """A wait whose job is neither in its list nor begun, at every look, gets the lost outcome; one whose
    job was pushed again (after the restart), one whose worker claimed it, one that heard from its worker,
    and one never queued wait on."""
    monkeypatch.setattr(results, "LOST_LOOKS_S", (0.3, 0.8))
    redis_dir = short_tmp("gg-lw-")
    server, client, waiter = await _waiter_on_own_redis(redis_dir)
    try:
        async with waiter.expect("lost-plain") as plain, waiter.expect("lost-stream", stream=True) as stream, \
                waiter.expect("pushed-again") as again, waiter.expect("claimed") as claimed, \
                waiter.expect("heard", stream=True) as heard, waiter.expect("never-queued") as unqueued:
            for pending in (plain, stream, again, claimed, heard):
                await client.lpush("q", f"job-{pending.task_id}")
                pending.queued("q", f"job-{pending.task_id}")
            server = _restart_empty(server, redis_dir)
            sync = redis.Redis.from_url(server.url)
            try:
                for _ in range(100):  # the waiter reconnects within its back-off (0.1 s, doubling)
                    if sync.exists(EPOCH_KEY):
                        break
                    await asyncio.sleep(0.05)
                sync.lpush("q", "job-pushed-again")
                sync.set(cancel_key("claimed"), JOB_STARTED)
                sync.publish(waiter.reply_channel, reply_message(REPLY_PIECE, "heard", seal_piece(SEALER, 0, "Hi")))
            finally:
                sync.close()
            with caplog.at_level("WARNING", logger="gateway.dispatch.results"):
                assert is_lost(await plain.get(10))
                assert [event async for event in stream.events(5)] == [lost_outcome()]
            for pending in (again, claimed, unqueued):
                with pytest.raises(ResultTimeout):
                    await pending.get(0.3)
            assert [event async for event in _first(heard.events(0.3))] == ["Hi"]
        assert "Redis came back without the data it held" in caplog.text
        assert "the job of request lost-plain was lost with Redis's data" in caplog.text
    finally:
        await waiter.aclose()
        await client.aclose()
        server.stop()


async def _first(events):
    async for event in events:
        yield event
        return


async def test_a_reconnect_to_a_redis_that_kept_its_data_loses_no_wait(short_tmp, monkeypatch):
    """The pub/sub connection dropped (``CLIENT KILL``), Redis's data kept: a wait whose job is nowhere (a
    stand-in: never pushed) is not taken for lost; only the epoch says the data went."""
    monkeypatch.setattr(results, "LOST_LOOKS_S", (0.2, 0.4))
    server, client, waiter = await _waiter_on_own_redis(short_tmp("gg-lk-"))
    try:
        async with waiter.expect("kept") as kept:
            kept.queued("q", "job-never-pushed")
            sync = redis.Redis.from_url(server.url)
            try:
                assert sync.client_kill_filter(_type="pubsub") == 1
            finally:
                sync.close()
            with pytest.raises(ResultTimeout):
                await kept.get(1.5)
    finally:
        await waiter.aclose()
        await client.aclose()
        server.stop()


def test_a_worker_claims_again_the_job_whose_claim_redis_lost_but_never_over_a_cancel(short_tmp):
    redis_dir = short_tmp("gg-lc-")
    server = RedisProcess.start(redis_dir, persist=False)
    client = redis.Redis.from_url(server.url)
    try:
        channel = RedisJobChannel(client, "running", streaming=False, sealer=SEALER)
        assert channel.claim_start()
        assert not channel.cancel_requested()  # the start's own look, answered from the claim
        client.delete(cancel_key("running"))  # Redis came back empty mid-generation
        channel._next_check = 0.0  # the next token's look (every CANCEL_CHECK_INTERVAL_S)
        assert not channel.cancel_requested()
        assert client.get(cancel_key("running")) == JOB_STARTED
        assert client.ttl(cancel_key("running")) > 3600
        client.set(cancel_key("running"), STOP_TIMED_OUT)  # a cancel is never overwritten
        channel._next_check = 0.0
        assert channel.cancel_requested()
        assert client.get(cancel_key("running")) == STOP_TIMED_OUT
    finally:
        client.close()
        server.stop()
