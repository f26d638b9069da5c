"""Usage counters against a real Redis: atomic limits, exact windows, UTC budgets.

Every test uses its own key prefix so tests sharing the session Redis cannot
see each other's usage. Time is passed in as ``now`` wherever a value
depends on it, so window and calendar edges are tested exactly.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.limits import CountersUnavailable, Refusal, Reservation, Scope, UsageCounters
from govgate.redis_server import RedisProcess
from tests.conftest import ROOT
from tests.own_redis import OUT_OF_MEMORY

pytestmark = pytest.mark.anyio

#: Mid-day, mid-month (2024-03-10 12:00:00 UTC), so minute-window tests cross no calendar edge.
T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))


def utc(*fields: int) -> float:
    """Epoch seconds of a UTC wall-clock time."""
    return float(calendar.timegm((*fields, 0, 0, 0)[:6]))


def rid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(redis_server.url)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}"


@pytest.fixture
def counters(client: aioredis.Redis, prefix: str) -> UsageCounters:
    return UsageCounters(client, prefix=prefix)


def only(**limits: int | None) -> dict:
    return {"principal": limits, "team": None}


# --- concurrency ---------------------------------------------------------------

async def test_concurrent_requests_never_exceed_a_daily_budget(counters: UsageCounters) -> None:
    budget = 2000
    limits = {"principal": {"tokens_per_day": budget}, "team": {"tokens_per_day": budget}}
    rng = random.Random(7)
    start = asyncio.Event()
    settled: list[int] = []
    refusals: list[Refusal] = []

    async def request() -> None:
        max_tokens = rng.randint(50, 200)
        generated = rng.randint(0, max_tokens)
        pause = rng.uniform(0.005, 0.03)
        await start.wait()
        outcome = await counters.reserve(rid(), "alice", "research", limits, max_tokens)
        if isinstance(outcome, Refusal):
            refusals.append(outcome)
            return
        await asyncio.sleep(pause)  # "generating"
        await counters.settle(outcome, generated)
        settled.append(generated)

    tasks = [asyncio.create_task(request()) for _ in range(50)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)

    usage = await counters.snapshot("alice", "research")
    print(f"\nadmitted {len(settled)}, refused {len(refusals)}, settled {sum(settled)} of {budget} tokens")
    assert sum(settled) <= budget
    assert refusals, "a budget far below the demand must refuse some requests"
    assert {r.code for r in refusals} == {"budget_exceeded"}
    assert {r.limit_name for r in refusals} == {"tokens_per_day"}
    assert usage["principal"]["tokens_today"] == usage["team"]["tokens_today"] == sum(settled)
    assert usage["principal"]["in_flight"] == 0
    assert usage["principal"]["requests_last_minute"] == len(settled)


async def test_rpm_limit_holds_across_two_processes(redis_server: RedisProcess, counters: UsageCounters,
                                                    prefix: str) -> None:
    limit, per_process = 150, 200
    start_at = time.time() + 2.0
    probes = [
        subprocess.Popen([sys.executable, "-m", "tests._rpm_probe", redis_server.url, prefix, "alice",
                          str(limit), str(per_process), repr(start_at)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    reports = []
    for probe in probes:
        out, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, err
        reports.append(json.loads(out))
    print(f"\nper process: {[(r['reserved'], len(r['refused']), r['finished_after_s']) for r in reports]}")

    assert sum(r["reserved"] for r in reports) == limit
    refused = [name for r in reports for name in r["refused"]]
    assert len(refused) == 2 * per_process - limit
    assert set(refused) == {"requests_per_minute"}
    usage = await counters.snapshot("alice", None)
    assert usage["principal"]["requests_last_minute"] == limit


# --- principal and team ------------------------------------------------------------

async def test_team_limit_binds_member_whose_own_limit_is_higher(counters: UsageCounters) -> None:
    limits = {"principal": {"tokens_per_day": 5000}, "team": {"tokens_per_day": 1000}}
    assert isinstance(await counters.reserve(rid(), "bob", "research", limits, 400, now=T), Reservation)
    assert isinstance(await counters.reserve(rid(), "alice", "research", limits, 550, now=T), Reservation)

    refusal = await counters.reserve(rid(), "alice", "research", limits, 100, now=T + 1)
    assert isinstance(refusal, Refusal)
    assert refusal.scope == Scope("team", "research")
    assert (refusal.code, refusal.limit_name, refusal.limit, refusal.used) == (
        "budget_exceeded", "tokens_per_day", 1000, 950)
    assert "team 'research' has used 950 of 1000 tokens today" in refusal.message
    # nothing of the refused request was recorded
    usage = await counters.snapshot("alice", "research", now=T + 1)
    assert usage["principal"]["tokens_today"] == 550
    assert usage["team"]["tokens_today"] == 950


async def test_personal_limit_binds_member_of_a_generous_team(counters: UsageCounters) -> None:
    limits = {"principal": {"tokens_per_day": 100}, "team": {"tokens_per_day": 5000}}
    assert isinstance(await counters.reserve(rid(), "alice", "research", limits, 60, now=T), Reservation)
    refusal = await counters.reserve(rid(), "alice", "research", limits, 60, now=T)
    assert isinstance(refusal, Refusal)
    assert refusal.scope == Scope("principal", "alice")
    assert (refusal.limit, refusal.used) == (100, 60)
    assert "principal 'alice' has used 60 of 100 tokens today" in refusal.message
    # a teammate still has room in the team budget
    assert isinstance(await counters.reserve(rid(), "bob", "research", limits, 60, now=T), Reservation)


async def test_refusal_names_the_limit_with_the_longest_wait(counters: UsageCounters) -> None:
    limits = {"principal": {"tokens_per_minute": 100, "tokens_per_day": 150, "requests_per_minute": 1},
              "team": {"requests_per_minute": 1}}
    await counters.reserve(rid(), "alice", "research", limits, 100, now=T)
    await counters.reserve(rid(), "bob", "research", {"principal": {}, "team": {}}, 0, now=T + 30)
    refusal = await counters.reserve(rid(), "alice", "research", limits, 100, now=T + 40)
    assert isinstance(refusal, Refusal)
    # failing: principal rpm (20 s), principal tpm (20 s), principal tpd (until midnight: 12 h - 40 s),
    # team rpm (50 s): the day budget keeps the request out longest
    assert (refusal.scope, refusal.limit_name) == (Scope("principal", "alice"), "tokens_per_day")
    assert refusal.retry_after_s == 12 * 3600 - 40

    refusal = await counters.reserve(rid(), "alice", "research", {"principal": {"requests_per_minute": 1},
                                                                 "team": {"requests_per_minute": 2}}, 1, now=T + 40)
    # principal rpm frees at T+60, team rpm (2 of 2) at T+60 too: a tie goes to the principal
    assert (refusal.scope.kind, refusal.limit_name, refusal.retry_after_s) == ("principal", "requests_per_minute", 20)
    refusal = await counters.reserve(rid(), "alice", "research", {"principal": {"requests_per_minute": 1},
                                                                 "team": {"requests_per_minute": 1}}, 1, now=T + 40)
    # team rpm needs both of its requests to age out (T+30 leaves at T+90): 50 s > 20 s
    assert (refusal.scope.kind, refusal.limit_name, refusal.retry_after_s) == ("team", "requests_per_minute", 50)


async def test_a_zero_limit_admits_nothing(counters: UsageCounters) -> None:
    refusal = await counters.reserve(rid(), "alice", None, only(requests_per_minute=0), 1, now=T)
    assert (refusal.limit_name, refusal.limit, refusal.used, refusal.retry_after_s) == ("requests_per_minute", 0, 0, 60)
    refusal = await counters.reserve(rid(), "alice", None, only(tokens_per_day=0), 1, now=T)
    assert (refusal.limit_name, refusal.retry_after_s) == ("tokens_per_day", 12 * 3600)
    assert isinstance(await counters.reserve(rid(), "alice", None, only(tokens_per_day=0), 0, now=T), Reservation)


# --- the minute window ----------------------------------------------------------------

async def test_request_window_slides_exactly(counters: UsageCounters) -> None:
    limits = only(requests_per_minute=3)
    for offset in (0, 30, 59):
        assert isinstance(await counters.reserve(rid(), "alice", None, limits, 10, now=T + offset), Reservation)
    usage = (await counters.snapshot("alice", None, now=T + 59))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"], usage["minute_window_frees_in_s"]) == (3, 30, 1)

    refusal = await counters.reserve(rid(), "alice", None, limits, 10, now=T + 59.5)
    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.limit_name, refusal.used, refusal.retry_after_s) == (
        "rate_limited", "requests_per_minute", 3, 1)  # 0.5 s rounds up to 1
    assert refusal.message == "principal 'alice' has made 3 of 3 requests allowed per minute"

    # at exactly T+60 the request made at T is out: the window is (now-60, now]
    usage = (await counters.snapshot("alice", None, now=T + 60))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"], usage["minute_window_frees_in_s"]) == (2, 20, 30)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 10, now=T + 61), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 10, now=T + 61)
    assert refusal.retry_after_s == 29  # the T+30 request leaves at T+90

    usage = (await counters.snapshot("alice", None, now=T + 61 + 60))["principal"]
    assert usage == {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 40,
                     "tokens_this_month": 40, "in_flight": 4, "minute_window_frees_in_s": 0}


async def test_token_window_retry_waits_for_enough_tokens_to_expire(counters: UsageCounters) -> None:
    limits = only(tokens_per_minute=300)
    for offset in (0, 20, 40):
        assert isinstance(await counters.reserve(rid(), "alice", None, limits, 100, now=T + offset), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 100, now=T + 50)
    assert (refusal.limit_name, refusal.used, refusal.retry_after_s) == ("tokens_per_minute", 300, 10)
    assert not refusal.never_fits
    refusal = await counters.reserve(rid(), "alice", None, limits, 200, now=T + 50)
    assert refusal.retry_after_s == 30 and not refusal.never_fits  # the T and T+20 entries must both leave
    refusal = await counters.reserve(rid(), "alice", None, limits, 301, now=T + 50)
    assert refusal.retry_after_s == 60 and "more than the limit" in refusal.message
    assert refusal.never_fits  # no wait lets 301 tokens into a 300-token minute
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 100, now=T + 60), Reservation)


async def test_settle_adjusts_the_minute_window_while_the_request_is_in_it(counters: UsageCounters) -> None:
    limits = only(tokens_per_minute=100)
    reservation = await counters.reserve(rid(), "alice", None, limits, 100, now=T)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 50, now=T + 1), Refusal)
    await counters.settle(reservation, 40, now=T + 2)
    usage = (await counters.snapshot("alice", None, now=T + 2))["principal"]
    assert usage["tokens_last_minute"] == 40
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 60, now=T + 3), Reservation)


# --- calendar budgets ------------------------------------------------------------------

async def test_daily_budget_resets_at_utc_midnight(counters: UsageCounters) -> None:
    limits = only(tokens_per_day=1000)
    noon = utc(2024, 3, 10, 12, 0, 0)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 900, now=noon), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 200, now=noon)
    assert (refusal.code, refusal.retry_after_s) == ("budget_exceeded", 12 * 3600)

    late = utc(2024, 3, 10, 23, 59, 59)
    last = await counters.reserve(rid(), "alice", None, limits, 100, now=late)
    assert isinstance(last, Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 1, now=late)
    assert (refusal.used, refusal.retry_after_s) == (1000, 1)
    assert refusal.message.startswith("principal 'alice' has used 1000 of 1000 tokens today")

    early = utc(2024, 3, 11, 0, 0, 1)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 1000, now=early), Reservation)
    usage = (await counters.snapshot("alice", None, now=early))["principal"]
    assert (usage["tokens_today"], usage["tokens_this_month"]) == (1000, 2000)

    # a request admitted before midnight and finished after it settles on its own day
    await counters.settle(last, 30, now=early + 5)
    assert (await counters.snapshot("alice", None, now=late))["principal"]["tokens_today"] == 930
    assert (await counters.snapshot("alice", None, now=early + 6))["principal"]["tokens_today"] == 1000


@pytest.mark.parametrize("last_moment, first_of_next, seconds_left_at_start", [
    (utc(2023, 12, 31, 23, 59, 59), utc(2024, 1, 1, 0, 0, 1), 31 * 86400),   # December -> January
    (utc(2024, 2, 29, 23, 59, 59), utc(2024, 3, 1, 0, 0, 1), 29 * 86400),    # leap February
    (utc(2023, 2, 28, 23, 59, 59), utc(2023, 3, 1, 0, 0, 1), 28 * 86400),    # common February
])
async def test_monthly_budget_resets_on_the_first_in_utc(counters: UsageCounters, last_moment: float,
                                                         first_of_next: float, seconds_left_at_start: int) -> None:
    limits = only(tokens_per_month=500)
    month_start = last_moment + 1 - seconds_left_at_start
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 500, now=month_start), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 1, now=month_start)
    assert (refusal.code, refusal.limit_name, refusal.retry_after_s) == (
        "budget_exceeded", "tokens_per_month", seconds_left_at_start)
    assert "500 of 500 tokens this month" in refusal.message
    refusal = await counters.reserve(rid(), "alice", None, limits, 1, now=last_moment)
    assert refusal.retry_after_s == 1

    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 500, now=first_of_next), Reservation)
    usage = (await counters.snapshot("alice", None, now=first_of_next))["principal"]
    assert (usage["tokens_today"], usage["tokens_this_month"]) == (500, 500)


# --- settle, release, idempotency, in-flight ---------------------------------------------

async def test_settle_reconciles_to_the_real_count(counters: UsageCounters) -> None:
    reservation = await counters.reserve(rid(), "alice", "research", {"principal": {}, "team": {}}, 100, now=T)
    usage = await counters.snapshot("alice", "research", now=T)
    assert usage["principal"]["tokens_today"] == usage["team"]["tokens_today"] == 100
    assert usage["principal"]["in_flight"] == usage["team"]["in_flight"] == 1

    await counters.settle(reservation, 30, now=T + 1)
    await counters.settle(reservation, 30, now=T + 2)  # idempotent
    await counters.settle(reservation, 99, now=T + 3)  # a second, different settle is ignored too
    await counters.release(reservation, now=T + 4)  # release after settle: no-op
    for view in (await counters.snapshot("alice", "research", now=T + 5)).values():
        assert (view["tokens_today"], view["tokens_this_month"], view["tokens_last_minute"]) == (30, 30, 30)
        assert (view["requests_last_minute"], view["in_flight"]) == (1, 0)


async def test_release_gives_tokens_back_but_the_request_still_counts(counters: UsageCounters) -> None:
    limits = only(requests_per_minute=2, tokens_per_day=100)
    reservation = await counters.reserve(rid(), "alice", None, limits, 100, now=T)
    await counters.release(reservation, now=T + 1)
    await counters.release(reservation, now=T + 2)
    await counters.settle(reservation, 100, now=T + 3)  # settle after release: no-op
    usage = (await counters.snapshot("alice", None, now=T + 3))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_last_minute"], usage["tokens_today"],
            usage["in_flight"]) == (1, 0, 0, 0)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 100, now=T + 4), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 0, now=T + 5)
    assert refusal.limit_name == "requests_per_minute"  # the released request used a slot


async def test_reserve_is_idempotent_per_request_id(counters: UsageCounters) -> None:
    limits = only(requests_per_minute=5)
    first = await counters.reserve("req-1", "alice", None, limits, 100, now=T)
    again = await counters.reserve("req-1", "alice", None, limits, 100, now=T + 1)
    assert again == first
    usage = (await counters.snapshot("alice", None, now=T + 1))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_today"], usage["in_flight"]) == (1, 100, 1)
    # a reservation survives a round trip through a dict (it may be kept elsewhere)
    await counters.settle(Reservation.from_dict(json.loads(json.dumps(first.to_dict()))), 10, now=T + 2)
    assert (await counters.snapshot("alice", None, now=T + 2))["principal"]["tokens_today"] == 10


async def test_in_flight_expires_after_the_ttl(client: aioredis.Redis, prefix: str) -> None:
    counters = UsageCounters(client, prefix=prefix, in_flight_ttl_s=900)
    limits = only(in_flight=1)
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 10, now=T), Reservation)
    refusal = await counters.reserve(rid(), "alice", None, limits, 10, now=T + 1)
    assert (refusal.code, refusal.used, refusal.retry_after_s) == ("too_many_in_flight", 1, 1)
    assert refusal.message == "principal 'alice' has 1 of 1 allowed requests in flight"
    assert (await counters.snapshot("alice", None, now=T + 899.999))["principal"]["in_flight"] == 1
    # the gateway that held it died: the slot comes back by itself
    assert (await counters.snapshot("alice", None, now=T + 900))["principal"]["in_flight"] == 0
    assert isinstance(await counters.reserve(rid(), "alice", None, limits, 10, now=T + 900), Reservation)


async def test_the_in_flight_count_kept_in_the_hash_always_equals_the_live_slots(client: aioredis.Redis,
                                                                                prefix: str) -> None:
    """The admit script answers in_flight from a count in the counters hash (no ZCOUNT) while no
    slot can have expired; whatever happens (settles, releases, undos, replacements, slots whose
    gateway died and expire, a hash written before the count was kept) it equals the live slots."""
    counters = UsageCounters(client, prefix=prefix, in_flight_ttl_s=30)
    window = f"{{{prefix}}}:p:alice:win"  # its in-flight slots: members at minus their expiry
    hash_key = f"{{{prefix}}}:p:alice:h"
    rng = random.Random(9)
    held: list[Reservation] = []
    now = T
    for step in range(400):
        now += rng.choice((0.5, 1, 3, 11))
        roll = rng.random()
        if roll < 0.45 or not held:
            reservation = await counters.reserve(rid(), "alice", "team-a", {"principal": {}, "team": {}}, 5, now=now)
            assert isinstance(reservation, Reservation)
            held.append(reservation)
        else:
            reservation = held.pop(rng.randrange(len(held)))
            if roll < 0.6:
                await counters.settle(reservation, 3, now=now)
            elif roll < 0.7:
                await counters.release(reservation, now=now)
            elif roll < 0.8:
                await counters.undo(reservation, now=now)
            elif roll < 0.9:
                reply = await counters.admit(reservation.request_id, "alice", "team-a",
                                             {"principal": {}, "team": {}}, 7, replace=reservation, now=now)
                assert isinstance(reply.outcome, Reservation)
                held.append(reply.outcome)
            # else: its gateway died; the slot expires 30 s after it was taken
        if step == 200:  # as a gateway from before the count was kept left the hash
            await client.hdel(hash_key, "f", "fx")
        live = await client.zcount(window, "-inf", f"(-{round(now * 1_000_000)}")
        usage = await counters.snapshot("alice", "team-a", now=now)
        assert usage["principal"]["in_flight"] == live == usage["team"]["in_flight"], step
    assert 0 < live < len(held)  # some held slots did expire on the way


async def test_cancelled_reserve_leaves_nothing_held(counters: UsageCounters) -> None:
    limits = only(tokens_per_day=1000)
    seen = []
    for yields in range(12):  # cancel at different points: before send, mid-flight, after the reply
        task = asyncio.create_task(counters.reserve(rid(), "alice", None, limits, 100, now=T))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        try:
            outcome = await task
        except asyncio.CancelledError:
            seen.append("cancelled")
            continue
        seen.append("finished")
        await counters.release(outcome, now=T)  # it finished first: the caller releases as usual
    await counters.aclose()
    print(f"\n{seen}")
    usage = (await counters.snapshot("alice", None, now=T))["principal"]
    assert (usage["tokens_today"], usage["in_flight"]) == (0, 0)


async def test_release_of_an_unknown_request_blocks_a_late_reserve(counters: UsageCounters) -> None:
    late = Reservation("req-late", (Scope("principal", "alice"),), 100, T)
    await counters.release(late, now=T)
    outcome = await counters.reserve("req-late", "alice", None, only(), 100, now=T)
    assert isinstance(outcome, Reservation) and outcome.tokens == 0
    usage = (await counters.snapshot("alice", None, now=T))["principal"]
    assert (usage["requests_last_minute"], usage["tokens_today"], usage["in_flight"]) == (0, 0, 0)


# --- snapshot, keys, scripts, failure --------------------------------------------------

async def test_snapshot_matches_what_was_reserved(counters: UsageCounters) -> None:
    everything = {"principal": {}, "team": {}}
    await counters.reserve(rid(), "alice", "research", everything, 100, now=T)
    await counters.reserve(rid(), "alice", "research", everything, 50, now=T + 10)
    await counters.reserve(rid(), "bob", "research", everything, 25, now=T + 20)
    await counters.reserve(rid(), "carol", None, everything, 7, now=T + 20)
    usage = await counters.snapshot("alice", "research", now=T + 30)
    assert usage == {
        "principal": {"requests_last_minute": 2, "tokens_last_minute": 150, "tokens_today": 150,
                      "tokens_this_month": 150, "in_flight": 2, "minute_window_frees_in_s": 30},
        "team": {"requests_last_minute": 3, "tokens_last_minute": 175, "tokens_today": 175,
                 "tokens_this_month": 175, "in_flight": 3, "minute_window_frees_in_s": 30},
    }
    assert (await counters.snapshot("carol", None, now=T + 30))["team"] is None
    empty = await counters.snapshot("dave", "nobody", now=T)
    assert empty["principal"] == empty["team"] == {
        "requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
        "in_flight": 0, "minute_window_frees_in_s": 0}


async def test_names_cannot_collide_and_every_key_expires(client: aioredis.Redis, counters: UsageCounters,
                                                          prefix: str) -> None:
    everything = {"principal": {}, "team": {}}
    names = ["x", "alice", "alice:x", "alice:x:win", "a%3Ab", "a:b", "{tag}", "é", "n" * 300, "n" * 301]
    for tokens, name in enumerate(names, start=1):
        await counters.reserve(rid(), name, name, everything, tokens, now=T)
    for tokens, name in enumerate(names, start=1):
        usage = await counters.snapshot(name, name, now=T)
        assert usage["principal"]["tokens_today"] == usage["team"]["tokens_today"] == tokens, name
        assert usage["principal"]["requests_last_minute"] == 1, name
    keys = [key.decode() async for key in client.scan_iter(match=f"{{{prefix}}}:*")]
    # per scope: window (with in-flight slots), hash; a request's record is a field of its principal's hash
    assert len(keys) == 2 * len(names) * 2
    # names are escaped into one ':'-free, bounded segment: the layout stays parseable
    layout = re.compile(r"\{%s\}:(r:[^:]+|[pt]:[^:]{1,100}:(win|h))" % re.escape(prefix))
    assert [key for key in keys if not layout.fullmatch(key)] == []
    ttls = [await client.pttl(key) for key in keys]
    assert all(ttl > 0 for ttl in ttls), sorted(zip(ttls, keys))[:3]


async def test_scripts_are_reloaded_after_a_flush(client: aioredis.Redis, counters: UsageCounters) -> None:
    await counters.reserve(rid(), "alice", None, only(), 1, now=T)
    await client.script_flush()
    assert isinstance(await counters.reserve(rid(), "alice", None, only(), 1, now=T), Reservation)
    assert (await counters.snapshot("alice", None, now=T))["principal"]["requests_last_minute"] == 2


async def test_bad_arguments_are_refused_before_redis() -> None:
    counters = UsageCounters(aioredis.Redis.from_url("unix:///nonexistent/redis.sock"))
    with pytest.raises(ValueError, match="unknown principal limit"):
        await counters.reserve(rid(), "alice", None, only(tokens_per_minutes=5), 1)
    with pytest.raises(ValueError, match="non-negative"):
        await counters.reserve(rid(), "alice", None, only(tokens_per_day=-1), 1)
    with pytest.raises(ValueError, match="tokens"):
        await counters.reserve(rid(), "alice", None, only(), -1)
    with pytest.raises(ValueError, match="name"):
        await counters.reserve(rid(), "", None, only(), 1)
    with pytest.raises(ValueError, match="NUL"):  # the mark of an in-flight slot in the window's set
        await counters.reserve("\0" + rid(), "alice", None, only(), 1)
    with pytest.raises(ValueError, match="NUL"):
        await counters.admit("\0x", "alice", None, only(), 1)


async def test_redis_down_raises_counters_unavailable(short_tmp) -> None:
    server = RedisProcess.start(short_tmp("gg-down-"), persist=False)
    redis_client = aioredis.Redis.from_url(server.url)
    counters = UsageCounters(redis_client, prefix="down")
    try:
        assert isinstance(await counters.reserve(rid(), "alice", None, only(), 1), Reservation)
        server.stop()
        for call in (counters.reserve(rid(), "alice", None, only(), 1), counters.snapshot("alice", None),
                     counters.release(Reservation("r", (Scope("principal", "alice"),), 1, T))):
            began = time.perf_counter()
            with pytest.raises(CountersUnavailable, match="usage counters unavailable"):
                await call
            print(f"\nCountersUnavailable after {1000 * (time.perf_counter() - began):.0f} ms")
    finally:
        server.stop()
        await redis_client.aclose()


async def test_cost_per_call(counters: UsageCounters) -> None:
    """Prints per-call latency (no assertion on speed): the figures for the report."""
    limits = {"principal": {name: 10**9 for name in ("requests_per_minute", "tokens_per_minute",
                                                       "tokens_per_day", "tokens_per_month", "in_flight")},
              "team": {"tokens_per_day": 10**9}}
    timings: dict[str, list[float]] = {"reserve": [], "settle": [], "snapshot": [], "refused": []}
    for _ in range(400):
        began = time.perf_counter()
        reservation = await counters.reserve(rid(), "alice", "research", limits, 100)
        timings["reserve"].append(time.perf_counter() - began)
        began = time.perf_counter()
        await counters.settle(reservation, 50)
        timings["settle"].append(time.perf_counter() - began)
        began = time.perf_counter()
        await counters.snapshot("alice", "research")
        timings["snapshot"].append(time.perf_counter() - began)
    tight = {"principal": {"tokens_per_minute": 100}, "team": None}
    for _ in range(100):  # refusal path: walks the 400-entry window to compute retry_after
        began = time.perf_counter()
        assert isinstance(await counters.reserve(rid(), "alice", "research", tight, 100), Refusal)
        timings["refused"].append(time.perf_counter() - began)
    print()
    for name, samples in timings.items():
        samples.sort()
        print(f"{name:8s} p50 {1e6 * statistics.median(samples):6.0f} µs   "
              f"p99 {1e6 * samples[int(0.99 * len(samples))]:6.0f} µs   (window of ~400 entries)")
    usage = await counters.snapshot("alice", "research")
    assert usage["principal"]["requests_last_minute"] == 400 and usage["principal"]["in_flight"] == 0


# --- the request's record -------------------------------------------------------------

async def test_the_record_is_a_field_of_the_principals_hash_and_goes_with_its_window_entry(
        client: aioredis.Redis, counters: UsageCounters, prefix: str) -> None:
    """Read and written with the principal's counters (no command of its own: before, a SET at the
    admission and a SET … GET at the settle); once the request has ended and its window entry left,
    the prune deletes both."""
    everything = {"principal": {}, "team": {}}
    principal_hash, team_hash = f"{{{prefix}}}:p:alice:h", f"{{{prefix}}}:t:team-a:h"
    ended = []
    for _ in range(5):
        reservation = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T)
        assert isinstance(reservation, Reservation)
        field = f"r:{reservation.request_id}"
        # (a reserved record keeps its gateway's wait, '-' unsaid, and names its team: a reservation nobody
        # recorded is given back in both scopes)
        assert await client.hget(principal_hash, field) == f"reserved 10 {round(T * 1e6)} - team-a".encode()
        assert not await client.exists(counters._record_key(reservation.request_id))
        assert not await client.hexists(team_hash, field)
        await counters.settle(reservation, 7, now=T + 1)
        assert await client.hget(principal_hash, field) == f"settled 10 {round(T * 1e6)}".encode()
        await counters.settle(reservation, 100, now=T + 2)  # a second settle changes nothing
        ended.append(field)
    assert (await counters.snapshot("alice", "team-a", now=T + 2))["principal"]["tokens_today"] == 5 * 7
    assert isinstance(await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T + 61), Reservation)
    assert [await client.hget(principal_hash, field) for field in ended] == [None] * 5


async def test_a_request_longer_than_the_window_keeps_its_record_until_it_ends(
        client: aioredis.Redis, counters: UsageCounters, prefix: str) -> None:
    everything = {"principal": {}, "team": {}}
    principal_hash = f"{{{prefix}}}:p:alice:h"
    long = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T)
    for _ in range(5):
        await counters.settle(await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T), 10, now=T)
    await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T + 61)  # prunes the five and long's entry
    assert await client.hget(principal_hash, f"r:{long.request_id}") == \
        f"reserved 10 {round(T * 1e6)} - team-a".encode()
    assert await counters.held(long.request_id, "alice", "team-a") == long
    await counters.settle(long, 4, now=T + 70)
    assert not await client.hexists(principal_hash, f"r:{long.request_id}")  # its window entry is gone: so is it
    assert await counters.held(long.request_id, "alice", "team-a") is None
    await counters.settle(long, 100, now=T + 71)  # unknown now: nothing changes
    usage = (await counters.snapshot("alice", "team-a", now=T + 71))
    for scope in ("principal", "team"):
        assert (usage[scope]["tokens_today"], usage[scope]["in_flight"]) == (10 * 5 + 4 + 10, 1), scope


async def test_a_record_an_older_gateway_kept_in_its_own_key_is_still_settled(
        client: aioredis.Redis, counters: UsageCounters, prefix: str) -> None:
    reservation = await counters.reserve(rid(), "alice", "team-a", {"principal": {}, "team": {}}, 10, now=T)
    record = await client.hget(f"{{{prefix}}}:p:alice:h", f"r:{reservation.request_id}")
    await client.hdel(f"{{{prefix}}}:p:alice:h", f"r:{reservation.request_id}")  # as an older gateway wrote it
    await client.set(counters._record_key(reservation.request_id), record, px=60_000)
    assert await counters.held(reservation.request_id, "alice", "team-a") == reservation
    await counters.settle(reservation, 3, now=T + 1)
    assert (await client.get(counters._record_key(reservation.request_id))).startswith(b"settled ")
    usage = await counters.snapshot("alice", "team-a", now=T + 1)
    assert (usage["principal"]["tokens_today"], usage["principal"]["in_flight"]) == (3, 0)
    await counters.settle(reservation, 9, now=T + 2)
    assert (await counters.snapshot("alice", "team-a", now=T + 2))["principal"]["tokens_today"] == 3


async def test_a_full_redis_refuses_a_reservation_even_with_a_window_to_prune(client: aioredis.Redis,
                                                                              counters: UsageCounters) -> None:
    """Redis refuses a script's writes when out of memory only if its first write is one that may grow
    memory (ZADD, HSET): the pruning deletions (HDEL, ZREM, ZREMRANGEBYSCORE) of a reservation are
    queued behind its own writes, so a full Redis refuses the reservation rather than letting it in (it
    did with the record's SET NX first; without it, a prune or an in-flight recount came first)."""
    everything = {"principal": {}, "team": {}}
    for i in range(6):
        await counters.settle(await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T), 10, now=T)
    await client.hdel(f"{counters._tag}:p:alice:h", "fx")  # and an in-flight recount due
    before = await counters.snapshot("alice", "team-a", now=T + 1)
    await client.config_set("maxmemory", "1")
    try:
        with pytest.raises(CountersUnavailable, match=OUT_OF_MEMORY):
            await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T + 61)
    finally:
        await client.config_set("maxmemory", "0")
    assert await counters.snapshot("alice", "team-a", now=T + 1) == before  # nothing pruned, nothing held


async def test_records_an_older_gateways_prune_left_go_when_the_keys_are_renewed(
        client: aioredis.Redis, counters: UsageCounters, prefix: str) -> None:
    """Rolling upgrade: a gateway from before 2026-12-02 prunes the entries that left the window (their
    sorted-set members and w: fields) but not the records a newer gateway keeps beside them in the
    principal's hash, which then stayed there for good (seen with an old gateway admitting after a new
    one on one Redis). The first reservation of a month drops them (one HGETALL a month, none per request):
    an ended request's, and a reserved one older than a record's TTL (its gateway died, nobody settled
    it); a record still reserved within it stays with its request, which still settles."""
    everything = {"principal": {}, "team": {}}
    hash_key, window_key = f"{{{prefix}}}:p:alice:h", f"{{{prefix}}}:p:alice:win"

    async def older_gateways_prune() -> None:  # its script's prune, by hand: members, w: fields, counts
        gone = await client.zrangebyscore(window_key, "(0", "+inf")
        await client.zrem(window_key, *gone)
        await client.hdel(hash_key, *(b"w:" + member for member in gone))
        await client.hset(hash_key, mapping={"n": 0, "s": 0})

    ended = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T)
    await counters.settle(ended, 4, now=T + 1)
    abandoned = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T + 2)
    await older_gateways_prune()
    same_month = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=T + 120)
    await counters.settle(same_month, 5, now=T + 121)
    assert await client.hexists(hash_key, f"r:{ended.request_id}")  # no look within the month
    running = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=utc(2024, 3, 31, 23))
    await older_gateways_prune()
    later = await counters.reserve(rid(), "alice", "team-a", everything, 10, now=utc(2024, 4, 1))
    assert not await client.hexists(hash_key, f"r:{ended.request_id}")
    assert not await client.hexists(hash_key, f"r:{abandoned.request_id}")
    assert (await client.hget(hash_key, f"r:{running.request_id}")).startswith(b"reserved ")
    assert await client.hexists(hash_key, f"r:{later.request_id}")
    await counters.settle(running, 5, now=utc(2024, 4, 1) + 1)
    await counters.settle(later, 5, now=utc(2024, 4, 1) + 1)
    assert (await counters.snapshot("alice", "team-a", now=utc(2024, 4, 1) + 1))["principal"]["in_flight"] == 0
