"""The one-call admission path of the usage counters against a real Redis.

One script reads the snapshot and the model's queue depth and reserves in
the same step (docs/architecture.md, "Usage counters"): the depth it reads,
the queue_full refusal that holds nothing however many requests race, the
early reservation replaced or undone, and what an admitted request costs
in Redis commands (a count from INFO commandstats, not a timing).
"""

from __future__ import annotations

import asyncio
import calendar
import uuid
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bench._commandstats import command_calls_async, commands_since_async
from gateway.limits import QueueAtLimit, Refusal, Reservation, UsageCounters
from gateway.limits.admitting import admitting_key
from gateway.limits.queue import model_queue
from govgate.redis_server import RedisProcess
from workers.contract.queue_layout import queue_keys
from workers.contract.jobs import queue_for

pytestmark = pytest.mark.anyio

T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))
EVERYTHING = {"principal": {}, "team": {}}


def rid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(redis_server.url)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def counters(client: aioredis.Redis) -> UsageCounters:
    return UsageCounters(client, prefix=f"test:{uuid.uuid4().hex}")


@pytest.fixture
def model() -> str:
    """A model name no other test queues for."""
    return f"admit-{uuid.uuid4().hex[:8]}"


async def fill(client: aioredis.Redis, model: str, per_priority: dict[int, int]) -> None:
    keys = queue_keys(queue_for(model))
    for priority, count in per_priority.items():
        await client.rpush(keys[priority], *[b"job"] * count)


async def test_the_snapshot_call_returns_the_queue_depth(client: aioredis.Redis, counters: UsageCounters,
                                                         model: str) -> None:
    reply = await counters.admit(None, "alice", "research", None, 0, queue=model_queue(model, 10), now=T)
    assert (reply.waiting, reply.outcome) == (0, None)
    await fill(client, model, {0: 2, 5: 3, 9: 1})
    for likely in (None, 0, 5, 7, 9):  # the order the lists are read in changes the cost, never the sum
        reply = await counters.admit(None, "alice", "research", None, 0, queue=model_queue(model, 10, likely), now=T)
        assert reply.waiting == 6, likely
    reserved = await counters.admit(rid(), "alice", "research", EVERYTHING, 10, queue=model_queue(model, 10), now=T)
    assert isinstance(reserved.outcome, Reservation) and reserved.waiting == 6
    # the usage in the reply is what the policy judges: before this request
    assert reserved.usage["principal"]["requests_last_minute"] == 0
    assert (await counters.snapshot("alice", "research", now=T))["principal"]["requests_last_minute"] == 1
    assert (await counters.admit(None, "alice", None, None, 0, now=T)).waiting is None  # no queue asked for


async def test_a_full_queue_refuses_in_the_same_step_and_holds_nothing(client: aioredis.Redis,
                                                                        counters: UsageCounters, model: str) -> None:
    """Many requests race for a full queue under an in-flight limit of 1: each is refused queue_full,
    none for being in flight, because a refused request never held a slot, not even for a moment."""
    await fill(client, model, {5: 2})
    limits = {"principal": {"in_flight": 1, "requests_per_minute": 100}, "team": None}
    replies = await asyncio.gather(*(counters.admit(rid(), "alice", None, limits, 10, queue=model_queue(model, 2),
                                                    now=T) for _ in range(40)))
    assert {type(r.outcome) for r in replies} == {QueueAtLimit}
    assert {(r.outcome.waiting, r.outcome.limit) for r in replies} == {(2, 2)}
    usage = (await counters.snapshot("alice", None, now=T))["principal"]
    assert (usage["in_flight"], usage["requests_last_minute"], usage["tokens_today"]) == (0, 0, 0)
    # one place frees: exactly one racer takes it (the in-flight limit), the rest are told why
    await client.lpop(queue_keys(queue_for(model))[5])
    replies = await asyncio.gather(*(counters.admit(rid(), "alice", None, limits, 10, queue=model_queue(model, 2),
                                                    now=T) for _ in range(40)))
    outcomes = [r.outcome for r in replies]
    assert sum(isinstance(o, Reservation) for o in outcomes) == 1
    assert {o.code for o in outcomes if not isinstance(o, Reservation)} == {"too_many_in_flight"}


async def test_an_early_reservation_is_replaced_or_undone(counters: UsageCounters) -> None:
    guessed = {"principal": {"tokens_per_day": 1000}, "team": None}
    early = await counters.admit("req-1", "alice", None, guessed, 300, now=T)
    assert isinstance(early.outcome, Reservation)
    # the decision obliged other limits and granted fewer tokens: replaced in one step, counted once
    obliged = {"principal": {"tokens_per_day": 200}, "team": None}
    replaced = await counters.admit("req-1", "alice", None, obliged, 150, replace=early.outcome, now=T)
    assert isinstance(replaced.outcome, Reservation) and replaced.outcome.tokens == 150
    usage = (await counters.snapshot("alice", None, now=T))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"], usage["tokens_today"],
            usage["in_flight"]) == (1, 150, 150, 1)
    # a replacement is checked like any reservation: 150 more would pass 200 today
    refused = await counters.admit("req-2", "alice", None, obliged, 100, now=T)
    assert isinstance(refused.outcome, Refusal) and refused.outcome.code == "budget_exceeded"
    # the policy denied after all: undone, as if never made (a denied request is not a request made)
    await counters.undo(replaced.outcome, now=T)
    usage = (await counters.snapshot("alice", None, now=T))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"], usage["tokens_today"],
            usage["in_flight"]) == (0, 0, 0, 0)
    await counters.settle(replaced.outcome, 50, now=T)  # too late: nothing changes
    assert (await counters.snapshot("alice", None, now=T))["principal"]["tokens_today"] == 0


async def test_an_admitted_request_costs_a_bounded_number_of_redis_commands(short_tmp) -> None:
    """Admission (snapshot, reserve and queue depth: one script) plus the settle, for a principal in a
    team with every limit set, a full minute window to prune and a queue holding requests: at most 22
    commands a request, scripts' own commands counted (before the one-script path it was 108; 25 while
    in-flight was counted with a ZCOUNT per scope and kept in a sorted set of its own; 21 while the
    request's record was a key of its own, with a SET NX and a SET … GET; 20 before an admitted request held
    its place in the queue until queued, h8 finding 2: the admitting hash's HGETALL and HSET in the admit
    script, and the HDEL its push makes, here sent on its own)."""
    server = RedisProcess.start(short_tmp("gg-cmds-"), persist=False)
    client = aioredis.Redis.from_url(server.url)
    try:
        big = 10**9
        every = {name: big for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day",
                                        "tokens_per_month", "in_flight")}
        limits = {"principal": every, "team": every}
        counters = UsageCounters(client)
        await client.rpush(queue_keys(queue_for("m"))[5], b"job", b"job")

        async def one(now: float) -> None:
            reply = await counters.admit(rid(), "alice", "research", limits, 100, queue=model_queue("m", 64, 5),
                                         now=now)
            assert isinstance(reply.outcome, Reservation) and reply.waiting == 2
            await client.hdel(admitting_key("m"), reply.outcome.request_id)  # the push's part: its HDEL
            await counters.settle(reply.outcome, 60, now=now)

        for i in range(301):  # a minute of requests, 0.2 s apart: from now on each admission prunes one
            await one(T + 0.2 * i)
        before = await command_calls_async(client)
        for i in range(301, 309):
            await one(T + 0.2 * i)
        spent = await commands_since_async(client, before)
        print(f"\n{sum(spent.values()) / 8} commands per request: {dict(spent.most_common())}")
        assert spent["evalsha"] == 2 * 8  # one call to admit, one to settle
        assert spent["llen"] <= 8 and spent["hdel"] >= 2  # one list read each; the window was pruned
        assert spent["zcount"] == 0  # in flight: the count kept in the counters hash
        assert spent["zadd"] == 2 * 8  # one per scope: window entry and in-flight slot together
        assert spent["set"] == 0  # the record rides on the principal's HMGET and HSET
        assert spent["hgetall"] == 8  # the places held by requests admitted and not yet queued
        assert sum(spent.values()) <= 22 * 8
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.parametrize("mode", ["fifo", "fair"])
async def test_an_early_reservations_place_taken_at_its_push_costs_one_command_more_and_no_round_trip(
        short_tmp, mode) -> None:
    """Probe p2 #1: an early reservation (made before the policy decides) takes no place; its push checks
    the queue and takes it. Admit, push and settle, with two jobs of another team waiting: the same three
    calls as when the admission takes the place, and one command more (fifo: the push's HGETALL, EXISTS and
    LLEN in place of the admit's HSET and the push's HDEL; fair: its two HGETALLs and, another team
    waiting, the shares' HMGET)."""
    import os

    from gateway.dispatch.queue import Dispatcher
    from gateway.limits.queue import fair_model_queue
    from tests.gateway.test_celery_message import _job
    from workers.contract.fair_queues import SHARES_KEY
    from workers.contract.sealing import Sealer

    server = RedisProcess.start(short_tmp("gg-cmds-"), persist=False)
    client = aioredis.Redis.from_url(server.url)
    every = {name: 10**9 for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day",
                                      "tokens_per_month", "in_flight")}
    spent = {}
    try:
        for place in (True, False):
            await client.flushall()
            await client.hset(SHARES_KEY, "*", 1)
            counters = UsageCounters(client)
            dispatcher = Dispatcher(client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)
            for other in ("o1", "o2"):
                await dispatcher.enqueue(_job(other, "m", "other"))

            async def one() -> None:
                request_id = rid()
                queue = model_queue("m", 64, 5) if mode == "fifo" else fair_model_queue("m", "research", 64)
                reply = await counters.admit(request_id, "alice", "research", {"principal": every, "team": every},
                                             100, queue=queue, place=place)
                assert isinstance(reply.outcome, Reservation)
                assert (reply.outcome.admitting is None) is (not place)
                await dispatcher.enqueue(_job(request_id, "m", "research"), priority=5,
                                         check=None if place else queue)
                await counters.settle(reply.outcome, 60)

            for _ in range(4):
                await one()
            before = await command_calls_async(client)
            for _ in range(8):
                await one()
            spent[place] = await commands_since_async(client, before)
    finally:
        await client.aclose()
        server.stop()
    assert spent[False]["evalsha"] == spent[True]["evalsha"] == 3 * 8  # admit, push, settle
    assert spent[False]["hdel"] == 0 and spent[True]["hdel"] == 8  # no place to take back
    assert sum(spent[False].values()) - sum(spent[True].values()) == 8


async def test_a_refused_replacement_leaves_nothing_to_release(counters: UsageCounters) -> None:
    early = await counters.admit("req-1", "alice", "research", EVERYTHING, 300, now=T)
    assert isinstance(early.outcome, Reservation)
    strict = {"principal": {"tokens_per_day": 100}, "team": {}}
    replaced = await counters.admit("req-1", "alice", "research", strict, 150, replace=early.outcome, now=T)
    assert isinstance(replaced.outcome, Refusal) and replaced.outcome.used == 0  # the early tokens were given back
    assert await counters.held("req-1", "alice", "research") is None
    await counters.release(early.outcome, now=T)  # a caller that still releases it gives nothing back twice
    usage = await counters.snapshot("alice", "research", now=T)
    for scope in ("principal", "team"):
        assert (usage[scope]["requests_last_minute"], usage[scope]["tokens_today"], usage[scope]["in_flight"]) \
            == (0, 0, 0), scope


async def test_entries_that_left_the_window_count_out_before_they_are_deleted(counters: UsageCounters) -> None:
    """A few entries that left the window stay stored until more have left (fewer deletions under
    steady traffic); counts, retry times and the snapshot must not see them."""
    for i in range(20):
        assert isinstance(await counters.reserve(rid(), "alice", None, {"principal": {}, "team": None}, i + 1,
                                                 now=T + i), Reservation)
    now = T + 62.5  # the entries of T, T+1 and T+2 have left: three, fewer than are deleted at once
    usage = (await counters.snapshot("alice", None, now=now))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"]) == (17, sum(range(4, 21)))
    assert usage["minute_window_frees_in_s"] == 1  # T+3 leaves at T+63
    # 17 in the window, 16 allowed: the second oldest in it (T+4) must leave
    refusal = await counters.reserve(rid(), "alice", None, {"principal": {"requests_per_minute": 16},
                                                            "team": None}, 1, now=now)
    assert isinstance(refusal, Refusal) and (refusal.used, refusal.retry_after_s) == (17, 2)
    # 204 tokens in the window, 205 allowed, 10 asked: 9 must leave, T+3's 4 and T+4's 5
    refusal = await counters.reserve(rid(), "alice", None, {"principal": {"tokens_per_minute": 205},
                                                            "team": None}, 10, now=now)
    assert isinstance(refusal, Refusal) and (refusal.used, refusal.retry_after_s) == (204, 2)
    # later, all that left are deleted together and the counts still agree
    usage = (await counters.snapshot("alice", None, now=T + 70.5))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"]) == (9, sum(range(12, 21)))
