"""The fair-share pick script against a real Redis (``workers/contract/fair_order.py``).

A worker BRPOPs the lists in the order the script returns, so the tests do
the same with RPOP over that order: the first non-empty list gives the job,
and the next call charges it. Jobs cost the same (no corrections) unless a
test says otherwise, so the sequence of teams served is the schedule itself.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Iterator

import pytest
import redis

from gateway.dispatch.celery_message import queue_key
from tests.own_redis import doomed_redis  # noqa: F401 - fixture
from tests.own_redis import module_redis_server  # noqa: F401  (fixture: commands are counted server-wide)
from workers.contract.fair_order import DEFAULT_ESTIMATE_MS, PRUNE_AFTER_S, pick
from workers.contract.fair_queues import (SHARES_KEY, encode_name, fair_queue, parse_fair_queue, registry_key,
                                          tags_key, waiting_key, wake_key)

NOW = 1_000_000.0


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(SHARES_KEY)
    yield client
    client.delete(SHARES_KEY)
    client.close()


@pytest.fixture
def model(client: redis.Redis) -> Iterator[str]:
    name = f"fair-{uuid.uuid4().hex[:8]}"
    yield name
    client.delete(*client.keys(f"model.{name}*"), registry_key(name), tags_key(name), waiting_key(name),
                  wake_key(name))


def queue_jobs(client: redis.Redis, model: str, team: str, principal: str, count: int, *,
               priority: int = 5, now: float = NOW) -> str:
    """``count`` jobs pushed as a gateway pushes them (the list registered, the team's waiting raised)."""
    key = queue_key(fair_queue(model, team, principal), priority)
    for n in range(count):
        client.lpush(key, f"{team}/{principal}/{priority}/{n}")
    client.zadd(registry_key(model), {key: now})
    client.hincrby(waiting_key(model), encode_name(team), count)
    return key


def serve(client: redis.Redis, model: str, jobs: int, *, now: float = NOW) -> list[str]:
    """Take ``jobs`` jobs as a worker does; the served jobs' payloads in order."""
    served = []
    order = pick(client, model, now=now).order
    for _ in range(jobs):
        for key in order:
            item = client.rpop(key)
            if item is not None:
                break
        else:
            break
        assert key != wake_key(model)
        served.append(item.decode())
        order = pick(client, model, popped=key, now=now).order
    return served


def teams_of(served: list[str]) -> list[str]:
    return [job.split("/")[0] for job in served]


def assert_shares_held(sequence: list[str], weights: dict[str, float], slack: float = 1.0) -> None:
    """In every prefix of ``sequence``, each team's count is within ``slack`` jobs of its weight's share."""
    total = sum(weights.values())
    seen: Counter[str] = Counter()
    for n, team in enumerate(sequence, start=1):
        seen[team] += 1
        for name, weight in weights.items():
            assert abs(seen[name] - n * weight / total) <= slack, (n, dict(seen), sequence)


def test_two_equal_teams_alternate_although_one_queued_first(client, model):
    queue_jobs(client, model, "a", "alice", 20)
    queue_jobs(client, model, "b", "bob", 6)
    served = teams_of(serve(client, model, 26))
    assert_shares_held(served[:12], {"a": 1, "b": 1})
    assert served[12:] == ["a"] * 14  # b's queue ran dry: a takes the whole worker
    assert client.hgetall(waiting_key(model)) == {}  # every charge counted its job down


def test_weights_three_to_one(client, model):
    client.hset(SHARES_KEY, mapping={"a": 3, "b": 1, "*": 1})
    queue_jobs(client, model, "a", "alice", 30)
    queue_jobs(client, model, "b", "bob", 30)
    served = teams_of(serve(client, model, 40))
    assert_shares_held(served, {"a": 3, "b": 1})
    assert Counter(served) == {"a": 30, "b": 10}


def test_the_weights_are_read_from_the_shares_hash_once_a_second_not_per_job(client, model):
    """A take charges with the copy of the shares in the tags hash (read with the tags, no command of its
    own); the once-a-second recount renews it, so new shares reach the order within a second."""
    import json

    def hgetalls() -> int:
        return client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)

    client.hset(SHARES_KEY, mapping={"a": 3, "b": 1, "*": 1})
    queue_jobs(client, model, "a", "alice", 30)
    queue_jobs(client, model, "b", "bob", 30)
    before = hgetalls()
    served = teams_of(serve(client, model, 20, now=NOW))
    assert hgetalls() - before == 1  # the first call's recount, then the copy
    assert json.loads(client.hget(tags_key(model), "W")) == {"a": 3, "b": 1, "*": 1}
    assert_shares_held(served, {"a": 3, "b": 1})
    client.hset(SHARES_KEY, mapping={"a": 1, "b": 3})
    pick(client, model, now=NOW + 0.5)  # within the second: the copy answers
    assert json.loads(client.hget(tags_key(model), "W"))["a"] == 3
    before = hgetalls()
    pick(client, model, now=NOW + 1.5)  # the recount renews it
    assert hgetalls() - before == 1
    assert json.loads(client.hget(tags_key(model), "W")) == {"a": 1, "b": 3, "*": 1}


def test_three_teams_and_the_default_weight(client, model):
    client.hset(SHARES_KEY, mapping={"a": 1, "b": 2, "*": 3})  # c is not named: it gets '*'
    for team in ("a", "b", "c"):
        queue_jobs(client, model, team, f"{team}-user", 40)
    served = teams_of(serve(client, model, 60))
    assert_shares_held(served, {"a": 1, "b": 2, "c": 3})
    assert Counter(served) == {"a": 10, "b": 20, "c": 30}


def test_a_team_that_waited_builds_no_credit(client, model):
    queue_jobs(client, model, "a", "alice", 30)
    assert teams_of(serve(client, model, 10)) == ["a"] * 10  # b was idle meanwhile
    queue_jobs(client, model, "b", "bob", 30)
    served = teams_of(serve(client, model, 20))
    assert_shares_held(served, {"a": 1, "b": 1})  # b joins at the current virtual time: halves, not a b-run


def test_priority_orders_a_team_and_never_jumps_another(client, model):
    queue_jobs(client, model, "a", "alice", 5, priority=9)
    queue_jobs(client, model, "b", "bob", 10, priority=5)
    queue_jobs(client, model, "a", "alice", 3, priority=0)  # urgent, queued last
    served = serve(client, model, 16)
    assert_shares_held(teams_of(served), {"a": 1, "b": 1})
    own = [job for job in served if job.startswith("a/")]
    assert [job.split("/")[2] for job in own] == ["0"] * 3 + ["9"] * 5  # urgent first within a's share


def test_principals_of_a_team_share_its_share(client, model):
    queue_jobs(client, model, "a", "alice", 20)
    queue_jobs(client, model, "a", "anna", 20)
    queue_jobs(client, model, "b", "bob", 20)
    served = serve(client, model, 24)
    assert_shares_held(teams_of(served), {"a": 1, "b": 1})
    in_a = [job.split("/")[1] for job in served if job.startswith("a/")]
    assert_shares_held(in_a, {"alice": 1, "anna": 1})


def test_real_service_times_correct_the_shares(client, model):
    """Team a's jobs take three times as long as charged: once corrected, b gets three jobs per a job."""
    key_a = queue_jobs(client, model, "a", "alice", 40)
    key_b = queue_jobs(client, model, "b", "bob", 40)
    queue_of = {key_a: parse_fair_queue(key_a.rsplit(":", 1)[0]), key_b: parse_fair_queue(key_b.rsplit(":", 1)[0])}
    served, corrections, spent = [], [], Counter()
    order = pick(client, model, now=NOW).order
    for _ in range(40):
        key = next(k for k in order if client.llen(k))
        client.rpop(key)
        result = pick(client, model, popped=key, corrections=corrections, now=NOW)
        team = queue_of[key].team
        served.append(team)
        actual = 3 * DEFAULT_ESTIMATE_MS if team == "a" else DEFAULT_ESTIMATE_MS
        spent[team] += actual
        corrections = [(key.rsplit(":", 1)[0], actual, result.charged_ms)]
        order = result.order
    # the worker time each team got stays within two a-jobs of half (a correction lands one job late)
    assert abs(spent["a"] - spent["b"]) <= 2 * 3 * DEFAULT_ESTIMATE_MS, (served, spent)
    assert served.count("b") > 2 * served.count("a")
    svc = float(client.hget(tags_key(model), "svc"))
    assert DEFAULT_ESTIMATE_MS < svc < 3 * DEFAULT_ESTIMATE_MS  # the running mean moved with the real times


def test_a_new_list_wakes_a_worker_and_the_token_is_consumed(client, model, redis_server):
    import asyncio

    import redis.asyncio as aioredis

    from gateway.dispatch.fair_push import fair_push

    async def push(async_client: aioredis.Redis, team: str) -> str:
        key = queue_key(fair_queue(model, team, "pat"), 5)
        await fair_push(async_client, model, encode_name(team), key, "job")
        return key

    async def scenario() -> tuple[str, str, int, int]:
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            first = await push(async_client, "a")
            tokens_after_new = client.llen(wake_key(model))
            await push(async_client, "a")  # registered already: no token
            client.zadd(registry_key(model), {first: 1.0})  # registered long ago: registered again, no token
            client.delete(first)  # (a push onto a list that holds jobs does not read the registry)
            await push(async_client, "a")
            tokens_after_known = client.llen(wake_key(model))
            assert client.zscore(registry_key(model), first) > 1.0
            second = await push(async_client, "b")
            return first, second, tokens_after_new, tokens_after_known
        finally:
            await async_client.aclose()

    first, second, tokens_after_new, tokens_after_known = asyncio.run(scenario())
    assert (tokens_after_new, tokens_after_known) == (1, 1)
    assert client.llen(wake_key(model)) == 2
    assert client.hgetall(waiting_key(model)) == {b"a": b"3", b"b": b"1"}  # (one of a's jobs deleted by hand)
    assert set(client.zrange(registry_key(model), 0, -1)) == {first.encode(), second.encode()}
    result = pick(client, model, popped=wake_key(model))
    assert result.charged_ms is None
    assert client.llen(wake_key(model)) == 0  # the pick that follows a wake drops the stale tokens
    assert set(result.order[:-1]) == {first, second} and result.order[-1] == wake_key(model)


def test_a_push_onto_a_list_holding_jobs_reads_the_registry_only_every_eighth_length(client, model, redis_server):
    """The registry is read when the push finds the list empty, and at lengths 9, 17, …: a list that holds
    jobs is registered, so under load a push is LPUSH and HINCRBY only; a registry lost by hand while jobs
    keep coming is found again at the next such length."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.dispatch.fair_push import CHECK_EVERY, fair_push

    key = queue_key(fair_queue(model, "a", "pat"), 5)

    async def scenario() -> list[int]:
        async_client = aioredis.Redis.from_url(redis_server.url)
        registered = []
        try:
            for n in range(1, 2 * CHECK_EVERY + 2):
                if n == 2:
                    client.delete(registry_key(model))  # lost while the list holds a job
                before = dict(client.info("commandstats"))
                await fair_push(async_client, model, "a", key, "job")
                after = client.info("commandstats")
                if after.get("cmdstat_zscore", {}).get("calls", 0) > before.get("cmdstat_zscore", {}).get("calls", 0):
                    registered.append(n)
                assert (client.zscore(registry_key(model), key) is not None) == (n == 1 or n > CHECK_EVERY)
        finally:
            await async_client.aclose()
        return registered

    assert asyncio.run(scenario()) == [1, CHECK_EVERY + 1, 2 * CHECK_EVERY + 1]
    assert client.llen(key) == 2 * CHECK_EVERY + 1


def test_idle_empty_lists_are_pruned_and_busy_or_recent_ones_kept(client, model):
    old = NOW - PRUNE_AFTER_S - 1
    gone = queue_jobs(client, model, "a", "alice", 0, now=old)
    busy = queue_jobs(client, model, "b", "bob", 2, now=old)
    recent = queue_jobs(client, model, "c", "carol", 0, now=NOW - 5)
    client.hset(tags_key(model), mapping={"V": 50, "t:a": 10, "v:a": 20, "p:a/alice": 15, "t:b": 70})
    order = pick(client, model, now=NOW).order
    assert gone not in order and busy in order and recent in order
    assert set(client.zrange(registry_key(model), 0, -1)) == {busy.encode(), recent.encode()}
    tags = client.hgetall(tags_key(model))
    assert b"t:a" not in tags and b"p:a/alice" not in tags  # behind their virtual times: nothing lost
    assert tags[b"t:b"] == b"70"


def test_waiting_counts_are_recounted_at_most_once_a_second(client, model):
    queue_jobs(client, model, "a", "alice", 3)
    queue_jobs(client, model, "b", "bob", 2)
    pick(client, model, now=NOW)
    client.hset(waiting_key(model), mapping={"a": 40, "b": 0, "ghost": 7})  # drift: a crash, a lost restore
    pick(client, model, now=NOW + 0.5)
    assert client.hget(waiting_key(model), "a") == b"40"  # not yet
    pick(client, model, now=NOW + 1.5)
    assert client.hgetall(waiting_key(model)) == {b"a": b"3", b"b": b"2"}


def test_names_with_separators_and_long_names_stay_apart(client, model):
    odd_team, odd_principal = "ops:eu/1%", "x" * 400  # longer than any name the key store takes: hashed
    odd = queue_jobs(client, model, odd_team, odd_principal, 4, priority=3)
    plain = queue_jobs(client, model, "ops", "eu", 4, priority=3)
    parsed = parse_fair_queue(odd.rsplit(":", 1)[0])
    assert parsed is not None and parsed.principal.startswith("#") and ":" not in parsed.team
    served = serve(client, model, 8)
    assert Counter(job.split("/")[0] for job in served) == {odd_team.split("/")[0]: 4, "ops": 4}
    assert_shares_held(["odd" if job.startswith("ops:") else "ops" for job in served], {"odd": 1, "ops": 1})
    tags = client.hgetall(tags_key(model))
    assert f"t:{encode_name(odd_team)}".encode() in tags and b"t:ops" in tags
    assert plain != odd


def test_a_warm_up_job_costs_the_mean_and_an_odd_job_moves_the_mean_only_so_far(client, model):
    from workers.contract.fair_order import NOT_MEASURED, SVC_ALPHA, SVC_CLAMP

    key = queue_jobs(client, model, "a", "alice", 3)
    queue = key.rsplit(":", 1)[0]
    order = pick(client, model, now=NOW).order
    assert client.rpop(order[0]) is not None
    first = pick(client, model, popped=key, now=NOW)
    assert first.charged_ms == DEFAULT_ESTIMATE_MS
    # a pool process's first job (not measured) while the mean is unknown: it costs nothing, teaches nothing
    pick(client, model, corrections=[(queue, NOT_MEASURED, first.charged_ms)], now=NOW)
    tags = client.hgetall(tags_key(model))
    assert float(tags[b"t:a"]) == 0 and b"svc" not in tags
    client.rpop(key)
    second = pick(client, model, popped=key, now=NOW)
    pick(client, model, corrections=[(queue, 20.0, second.charged_ms)], now=NOW)
    assert float(client.hget(tags_key(model), "svc")) == 20.0
    client.rpop(key)
    third = pick(client, model, popped=key, now=NOW)
    assert third.charged_ms == 20.0
    before = float(client.hget(tags_key(model), "t:a"))
    pick(client, model, corrections=[(queue, 2000.0, third.charged_ms)], now=NOW)  # one stalled job
    tags = client.hgetall(tags_key(model))
    assert float(tags[b"t:a"]) == pytest.approx(before + 2000.0 - 20.0)  # the team pays the real time
    assert float(tags[b"svc"]) == pytest.approx(20.0 + SVC_ALPHA * (SVC_CLAMP * 20.0 - 20.0))  # the mean, bounded


def test_principals_without_a_team_share_one_place_in_the_schedule(client, model):
    from workers.contract.fair_queues import NO_TEAM, job_queue

    for principal in ("nora", "ned"):
        key = queue_key(job_queue(model, None, principal), 5)
        client.lpush(key, *[f"{NO_TEAM}/{principal}/5/{n}" for n in range(10)])
        client.zadd(registry_key(model), {key: NOW})
    queue_jobs(client, model, "a", "alice", 10)
    served = serve(client, model, 12)
    assert_shares_held(teams_of(served), {NO_TEAM: 1, "a": 1})  # the two team-less principals: one share
    assert_shares_held([job.split("/")[1] for job in served if job.startswith(NO_TEAM)], {"nora": 1, "ned": 1})
    # names are never empty (keys.validate_name), but an empty one must still make a queue a worker reads
    assert parse_fair_queue(job_queue(model, "", "")) is not None


def test_a_take_reads_the_registry_from_its_copy_in_the_tags_hash(model, doomed_redis):
    """The take reads the tags hash whole (HGETALL), and in it the registry's members ('L'): the registry
    itself (ZRANGE) only when a push registered a new list (which deletes the copy), and once a second, so
    a list registered without deleting the copy (here a bare ZADD) is seen within a second.

    On a Redis of its own: it counts ZRANGE calls server-wide, which another test's process still at
    work on the shared server (a worker's recount) once made 2 where the take made 1."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway.dispatch.fair_push import fair_push
    from workers.contract import take as take_script
    from workers.contract.fair_queues import REGISTRY_COPY
    from workers.contract.jobs import queue_for
    from workers.contract.queue_layout import bell_key, idle_key, queue_keys

    redis_server = doomed_redis
    client = redis.Redis.from_url(redis_server.url)
    queue = queue_for(model)
    spec = [take_script.TakeQueue(idle_key(queue), bell_key(queue), queue_keys(queue), model)]

    def calls(name: str) -> int:
        return client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)

    def take(now: float) -> tuple[str | None, int]:
        before = calls("zrange")
        taken = take_script.take(client, "copy-unacked", None, spec, now=now)
        return (taken.key if taken else None), calls("zrange") - before

    async def push(team: str) -> str:
        key = queue_key(fair_queue(model, team, "pat"), 5)
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            await fair_push(async_client, model, encode_name(team), key, "job")
        finally:
            await async_client.aclose()
        return key

    a = asyncio.run(push("a"))
    asyncio.run(push("a"))
    assert take(NOW) == (a, 1)  # no copy yet: the registry read, the copy written
    assert client.hget(tags_key(model), REGISTRY_COPY) is not None
    assert take(NOW + 0.1) == (a, 0)  # from the copy
    b = asyncio.run(push("b"))  # a new list: the copy goes
    assert client.hget(tags_key(model), REGISTRY_COPY) is None
    assert take(NOW + 0.2) == (b, 1)
    c = queue_jobs(client, model, "c", "carol", 1, now=NOW)  # registered behind the copy's back
    assert take(NOW + 0.3) == (None, 0)  # not seen yet: the copy is under a second old
    assert take(NOW + 1.5)[0] == c  # seen: the registry is read once a second
    client.close()
