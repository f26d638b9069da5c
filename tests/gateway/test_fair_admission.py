"""Fair-share admission against a real Redis: each team may hold its share of a model's queue.

The admission script (gateway/limits/scripts.py) reads the model's waiting
hash and the shares hash instead of the plain lists in fair mode. Until the
queue core writes the waiting counts (push +1, worker pick -1) these tests
seed ``waiting_key`` and ``SHARES_KEY`` directly: the rule under test is the
script's. A Redis of the module's own, since ``SHARES_KEY`` is one key for
the whole deployment and served gateways of other tests publish it.
"""

from __future__ import annotations

import calendar
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from bench._commandstats import command_calls_async, commands_since_async
from gateway.limits import QueueAtLimit, Reservation, UsageCounters
from gateway.limits.admitting import admitting_key
from gateway.limits.fair_share import (NO_TEAM, drain_wait_s, estimated_wait_s, position, team_cap, team_field,
                                       team_label)
from gateway.limits.queue import fair_model_queue
from gateway.requests.refusals import QueueFull
from govgate.redis_server import RedisProcess
from workers.contract.fair_queues import SHARES_KEY, tags_key, waiting_key
from workers.contract.liveness import WORKERS_KEY, member, slot_members

pytestmark = pytest.mark.anyio

T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))
EVERYTHING = {"principal": {}, "team": {}}
LIMIT = 64


@pytest.fixture(scope="module")
def fair_redis() -> Iterator[RedisProcess]:
    folder = Path(tempfile.mkdtemp(prefix="gg-fa-"))
    server = RedisProcess.start(folder, persist=False)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def client(fair_redis: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(fair_redis.url)
    await redis_client.flushall()
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def counters(client: aioredis.Redis) -> UsageCounters:
    return UsageCounters(client, prefix=f"test:{uuid.uuid4().hex}")


MODEL = "fair-tiny"


async def seed(client: aioredis.Redis, waiting: dict[str | None, int], shares: dict[str, float] | None = None,
               svc_ms: float | None = None, live: int = 0) -> None:
    """The model's state as the queue core and the publisher leave it."""
    await client.delete(waiting_key(MODEL), tags_key(MODEL), WORKERS_KEY, SHARES_KEY, admitting_key(MODEL))
    if waiting:
        await client.hset(waiting_key(MODEL), mapping={team_field(t): n for t, n in waiting.items()})
    if shares:
        await client.hset(SHARES_KEY, mapping={k if k == "*" else team_field(k): v for k, v in shares.items()})
    if svc_ms is not None:
        await client.hset(tags_key(MODEL), mapping={"svc": svc_ms, "V": 0})
    alive_until = T + 3600  # the script reads liveness at the request's own clock
    for i in range(live):
        await client.zadd(WORKERS_KEY, {member(MODEL, f"w{i}"): alive_until})
    await client.zadd(WORKERS_KEY, {member(MODEL, "dead"): T - 1, member("other-model", "w"): alive_until})


async def ask(counters: UsageCounters, team: str | None, principal: str = "p") -> Reservation | QueueAtLimit:
    reply = await counters.admit(uuid.uuid4().hex, principal, team, EVERYTHING, 10,
                                 queue=fair_model_queue(MODEL, team, LIMIT), now=T)
    assert isinstance(reply.outcome, (Reservation, QueueAtLimit)), reply.outcome
    return reply.outcome


# ---------------------------------------------------------------- the rule's arithmetic

def test_caps_positions_and_waits() -> None:
    assert team_cap(64, 1, 2) == 32 and team_cap(64, 3, 4) == 48 and team_cap(64, 1, 4) == 16
    assert team_cap(64, 1, 1) == 64 and team_cap(64, 0.3, 0.3) == 64  # alone: every place
    assert team_cap(64, 1, 1000) == 1  # never fewer than one place
    assert team_cap(3, 1, 3) == 1 and team_cap(10, 1, 3) == 3
    assert drain_wait_s(1, 500, 2, 0.5) == 1 and drain_wait_s(9, 500, 2, 0.5) == 5
    assert drain_wait_s(1, 1000, 0, 0.5) == 2  # no live worker: one is assumed
    assert drain_wait_s(0, 1, 8, 1) == 1  # never below one second
    assert position(0, 0, 1, 1) == 1  # nothing waits: next
    assert position(3, 40, 1, 2) == 8  # served at half the rate: its 4th job comes about 8th
    assert position(30, 40, 1, 4) == 41  # never behind more than everything waiting now
    assert estimated_wait_s(8, 500, 2) == 2.0
    assert team_label(team_field("a:b/c")) == "a:b/c" and team_label(NO_TEAM) == "(no team)"


def test_every_team_name_the_key_store_takes_reads_back_as_itself() -> None:
    # GET /v1/models shows admins each waiting team by team_label(field): a valid team of 121-128 characters
    # (or with '@', spelt %40) must not come back as '#<sha256>', which names no team anyone knows.
    from gateway.auth.keys import validate_name
    for name in ("x" * 127 + "y", "a" + "@" * 127, "r" * 121):
        assert validate_name("team", name) == name
        assert team_label(team_field(name)) == name
    assert team_field("x" * 400).startswith("#")  # a name no key can hold is still hashed


# ---------------------------------------------------------------- admission

async def test_equal_shares_give_each_waiting_team_half_the_places(client, counters) -> None:
    await seed(client, {"a": 31, "b": 5}, {"*": 1})
    assert isinstance(await ask(counters, "a"), Reservation)  # 31 < 32
    await seed(client, {"a": 32, "b": 5}, {"*": 1})
    refused = await ask(counters, "a")
    assert isinstance(refused, QueueAtLimit) and refused.waiting == 37 and refused.limit == LIMIT
    assert refused.team is not None
    assert (refused.team.waiting, refused.team.cap, refused.team.share) == (32, 32, 0.5)
    assert isinstance(await ask(counters, "b"), Reservation)  # the other team still gets in
    assert isinstance(await ask(counters, "c"), Reservation)  # and a team with nothing waiting


async def test_weights_three_to_one(client, counters) -> None:
    await seed(client, {"a": 48, "b": 16}, {"a": 3, "b": 1, "*": 1})
    for team, cap in (("a", 48), ("b", 16)):
        refused = await ask(counters, team)
        assert isinstance(refused, QueueAtLimit) and refused.team is not None, team
        assert refused.team.cap == cap and refused.team.share == cap / LIMIT, team
    await seed(client, {"a": 47, "b": 15}, {"a": 3, "b": 1})
    assert isinstance(await ask(counters, "a"), Reservation)
    assert isinstance(await ask(counters, "b"), Reservation)
    # a team the shares do not name has the '*' weight (here none: 1)
    await seed(client, {"a": 10, "c": 16}, {"a": 3})
    refused = await ask(counters, "c")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None and refused.team.cap == 16
    # a weight that is not a positive number (never published so) counts as the '*' one
    await seed(client, {"a": 10, "c": 32}, {"a": 0, "c": "x", "*": 2})
    refused = await ask(counters, "c")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None
    assert (refused.team.cap, refused.team.weight, refused.team.waiting_weight) == (32, 2.0, 4.0)


async def test_one_teams_burst_does_not_lock_the_others_out(client, counters) -> None:
    """Team A alone fills the model's limit; B and C are still admitted, up to twice the limit in all."""
    await seed(client, {"a": LIMIT - 1}, {"*": 1})
    assert isinstance(await ask(counters, "a"), Reservation)  # alone, it may use every place
    await seed(client, {"a": LIMIT}, {"*": 1})
    refused = await ask(counters, "a")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None and refused.team.cap == LIMIT
    assert isinstance(await ask(counters, "b"), Reservation)  # the total is at the limit: B still gets in
    # B grew to 31 of its 32 while A kept its 64 (taken before B came): 95 in all, B admitted
    await seed(client, {"a": LIMIT, "b": 31}, {"*": 1})
    assert isinstance(await ask(counters, "b"), Reservation)
    # a third team arriving when all together hold twice the limit is refused, though under its cap
    await seed(client, {"a": LIMIT, "b": 40, "c": 24}, {"c": 5})
    refused = await ask(counters, "c")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None
    assert refused.team.at_ceiling and refused.team.waiting < refused.team.cap and refused.waiting == 2 * LIMIT


async def test_principals_without_a_team_share_one_teams_places(client, counters) -> None:
    await seed(client, {None: 32, "a": 3}, {"*": 1})
    refused = await ask(counters, None, principal="nora")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None and refused.team.cap == 32
    assert isinstance(await ask(counters, "a"), Reservation)


async def test_a_refused_request_holds_nothing(client, counters) -> None:
    await seed(client, {"a": 32, "b": 32}, {"*": 1})
    for _ in range(3):
        assert isinstance(await ask(counters, "a", principal="alice"), QueueAtLimit)
    usage = await counters.snapshot("alice", "a", now=T)
    assert usage["principal"]["in_flight"] == 0 and usage["team"]["requests_last_minute"] == 0


# ---------------------------------------------------------------- the 429

async def test_retry_after_follows_service_time_workers_share_and_backlog(client, counters) -> None:
    async def retry_after(waiting: dict, **state) -> tuple[int, QueueFull]:
        await seed(client, waiting, {"*": 1}, **state)
        refused = await ask(counters, "support")
        assert isinstance(refused, QueueAtLimit)
        full = QueueFull(refused.waiting, refused.limit, MODEL, "support", refused.team)
        return int(full.error().headers["Retry-After"]), full

    # one place to free, 500 ms a job, two live workers (a dead one and another model's not counted),
    # the team's share a half: 1 × 0.5 s / 2 / 0.5 = 0.5 s, so 1 s
    first, full = await retry_after({"support": 32, "b": 1}, svc_ms=500, live=2)
    assert first == 1 and full.places is not None and full.places.live_workers == 2
    # a backlog past the cap (taken while B was not waiting): 9 places, 4.5 s → 5
    assert (await retry_after({"support": 40, "b": 1}, svc_ms=500, live=2))[0] == 5
    assert (await retry_after({"support": 60, "b": 1}, svc_ms=500, live=2))[0] == 15
    # no service time measured yet: 1 s a job; no live worker: one assumed → 2 s for one place at half
    assert (await retry_after({"support": 32, "b": 1}))[0] == 2
    # one prefork worker of four pool processes beats four members (workers/heartbeat.py): it ends jobs four
    # times as often as a worker of one, so 9 places at half of 4 × (1 job / 2 s) take 9 × 2 / 4 / 0.5 = 9 s
    await seed(client, {"support": 40, "b": 1}, {"*": 1}, svc_ms=2000)
    await client.zadd(WORKERS_KEY, {m: T + 3600 for m in slot_members(MODEL, "prefork.1@host", 4)})
    refused = await ask(counters, "support")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None and refused.team.live_workers == 4
    assert QueueFull(refused.waiting, refused.limit, MODEL, "support", refused.team).error().headers[
        "Retry-After"] == "9"
    # a smaller share waits longer: 1:3 → cap 16, one place at a quarter of 2 workers of 500 ms → 1 s
    await seed(client, {"support": 20, "b": 1}, {"b": 3}, svc_ms=500, live=2)
    refused = await ask(counters, "support")
    assert isinstance(refused, QueueAtLimit)
    full = QueueFull(refused.waiting, refused.limit, MODEL, "support", refused.team)
    assert full.retry_after_s() == drain_wait_s(5, 500, 2, 0.25) == 5


async def test_the_429_body_names_the_model_team_and_share(client, counters) -> None:
    await seed(client, {"support": 32, "research": 8}, {"*": 1}, svc_ms=800, live=1)
    refused = await ask(counters, "support")
    assert isinstance(refused, QueueAtLimit)
    full = QueueFull(refused.waiting, refused.limit, MODEL, "support", refused.team)
    error = full.error()
    body = error.body()["error"]
    assert error.status == 429 and body["code"] == "queue_full" and body["type"] == "rate_limit_error"
    assert error.headers["Retry-After"] == "2"  # 1 × 0.8 s / 1 / 0.5
    assert [r["code"] for r in body["reasons"]] == ["queue_full"] and body["reasons"][0]["retry_after_s"] == 2
    assert "its share, 50 % of 64" in body["message"] and "its share, 50 % of 64" in body["reasons"][0]["message"]
    message = full.message()
    assert "model 'fair-tiny'" in message and "team support: 32 waiting, 32 places (its share, 50 % of 64)" in message
    assert "40 requests wait in all" in message
    record = full.record()
    assert record["code"] == "queue_full" and record["team"]["cap"] == 32 and record["team"]["share"] == 0.5
    assert record["team"]["retry_after_s"] == 2 and record["team"]["name"] == "support"


# ---------------------------------------------------------------- cost

async def test_fair_admission_costs_one_script_and_two_hash_reads(client, counters) -> None:
    """The fair queue check rides on the one admit script: HGETALL of the waiting hash and of the admitting
    hash, and an HMGET of the shares only when the team and another both have jobs waiting; the refusal
    reads two more."""
    await seed(client, {"a": 3, "b": 2}, {"*": 1})
    before = await command_calls_async(client)
    for _ in range(4):
        assert isinstance(await ask(counters, "a"), Reservation)
    spent = await commands_since_async(client, before)
    print(f"\nfair admission, two teams waiting: {sum(spent.values()) / 4} commands: {dict(spent.most_common())}")
    assert spent["evalsha"] == 4 and spent["hgetall"] == 2 * 4
    assert spent["hmget"] == 4 * 3  # the two scopes' counters, and the shares
    assert spent["llen"] == 0 and spent["exists"] == 0 and spent["hget"] == 0  # no plain lists, no svc read
    await seed(client, {"a": 3}, {"*": 1})  # alone: no shares needed
    before = await command_calls_async(client)
    assert isinstance(await ask(counters, "a"), Reservation)
    spent = await commands_since_async(client, before)
    assert spent["hgetall"] == 2 and spent["hmget"] == 2
    await seed(client, {"a": 32, "b": 1}, {"*": 1})  # refused: the service time and the live workers too
    before = await command_calls_async(client)
    assert isinstance(await ask(counters, "a"), QueueAtLimit)
    spent = await commands_since_async(client, before)
    assert spent["hget"] == 1 and spent["zrangebyscore"] == 1


async def test_an_admitted_and_settled_request_costs_what_it_costs_in_fifo_mode(client) -> None:
    """A principal in a team with every limit set, a full minute window, two teams waiting: at most 22
    commands a request, as tests/gateway/test_usage_admit.py holds fifo mode (19 in both when measured;
    21 while the request's record was a key of its own; 20 before an admitted request held its place
    until queued, whose HGETALL and HSET ride on the admit script and whose HDEL on the push's)."""
    every = {name: 10**9 for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day",
                                      "tokens_per_month", "in_flight")}
    limits = {"principal": every, "team": every}
    counters = UsageCounters(client)
    await seed(client, {"research": 2, "b": 3}, {"*": 1})
    queue = fair_model_queue(MODEL, "research", LIMIT)

    async def one(now: float) -> None:
        reply = await counters.admit(uuid.uuid4().hex, "alice", "research", limits, 100, queue=queue, now=now)
        assert isinstance(reply.outcome, Reservation) and reply.waiting == 5
        await client.hdel(admitting_key(MODEL), reply.outcome.request_id)  # the push's part: its HDEL
        await counters.settle(reply.outcome, 60, now=now)

    for i in range(301):  # a minute of requests, 0.2 s apart: from now on each admission prunes one
        await one(T + 0.2 * i)
    before = await command_calls_async(client)
    for i in range(301, 309):
        await one(T + 0.2 * i)
    spent = await commands_since_async(client, before)
    print(f"\n{sum(spent.values()) / 8} commands per request: {dict(spent.most_common())}")
    assert spent["evalsha"] == 2 * 8 and spent["hgetall"] == 2 * 8 and spent["llen"] == 0
    assert sum(spent.values()) <= 22 * 8
