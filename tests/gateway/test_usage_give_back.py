"""A reserve call that got no answer holds nothing once Redis answers again.

A Redis frozen (SIGSTOP) past the client's socket timeout fails the call,
but the script already written to its socket runs when it resumes; the
counters give back, in the background, what it took (docs/architecture.md,
"Usage counters"). Before, nothing did: the in-flight slot stayed taken
until its TTL (900 s) and the tokens charged for the day. A Redis of the
test's own, frozen by the test; a client timeout of a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.limits import CountersUnavailable, Reservation, UsageCounters
from govgate.redis_server import RedisProcess
from tests.own_redis import doomed_redis  # noqa: F401 - fixture

pytestmark = pytest.mark.anyio

LIMITS = {"principal": {"in_flight": 2}, "team": {"in_flight": 5}}
TIMEOUT_S = 0.5


@pytest.fixture
async def frozen_client(doomed_redis: RedisProcess) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.Redis.from_url(doomed_redis.url, socket_timeout=TIMEOUT_S)
    yield client
    await client.aclose()


def rid() -> str:
    return uuid.uuid4().hex


async def _held(url: str, principal: str, team: str) -> tuple[int, ...]:
    """Requests in the window, tokens today and in flight, of the principal and its team."""
    client = aioredis.Redis.from_url(url)
    try:
        usage = await UsageCounters(client).snapshot(principal, team)
    finally:
        await client.aclose()
    return tuple(usage[scope][name] for scope in ("principal", "team")
                 for name in ("requests_last_minute", "tokens_today", "in_flight"))


async def test_a_reserve_that_timed_out_in_a_frozen_redis_is_given_back_when_it_resumes(
        doomed_redis: RedisProcess, frozen_client: aioredis.Redis) -> None:  # noqa: F811
    counters = UsageCounters(frozen_client)
    await counters.snapshot("alice", "ops")  # an open connection in the pool: the next call is written at once
    os.kill(doomed_redis.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CountersUnavailable):  # a timeout: the script, written, runs when Redis resumes
            await counters.admit(rid(), "alice", "ops", LIMITS, 100)
    finally:
        os.kill(doomed_redis.process.pid, signal.SIGCONT)
    await counters.aclose()  # the give-back goes through once Redis answers
    assert await _held(doomed_redis.url, "alice", "ops") == (0, 0, 0, 0, 0, 0)
    # and the principal's slots serve again
    assert isinstance((await counters.admit(rid(), "alice", "ops", LIMITS, 100)).outcome, Reservation)


async def test_a_replacement_that_timed_out_gives_back_the_early_reservation_too(
        doomed_redis: RedisProcess, frozen_client: aioredis.Redis) -> None:  # noqa: F811
    counters = UsageCounters(frozen_client)
    request_id = rid()
    early = (await counters.admit(request_id, "bob", "ops", LIMITS, 100)).outcome
    assert isinstance(early, Reservation)
    os.kill(doomed_redis.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(CountersUnavailable):
            await counters.admit(request_id, "bob", "ops", LIMITS, 150, replace=early)
    finally:
        os.kill(doomed_redis.process.pid, signal.SIGCONT)
    await counters.aclose()
    assert await _held(doomed_redis.url, "bob", "ops") == (0, 0, 0, 0, 0, 0)


async def test_a_replacement_that_arrives_after_its_give_back_reserves_nothing(
        doomed_redis: RedisProcess) -> None:  # noqa: F811
    """The give-back may reach Redis first (it goes on another connection): it undoes the early
    reservation and leaves a tombstone, which the late replacement's script reads and so holds nothing.
    Without the tombstone it found no record and reserved anew."""
    client = aioredis.Redis.from_url(doomed_redis.url)
    counters = UsageCounters(client)
    request_id = rid()
    early = (await counters.admit(request_id, "carol", "ops", LIMITS, 100)).outcome
    assert isinstance(early, Reservation)
    await counters._finish(early, "undone", 0, None, bar=True)  # as the give-back of a failed replacement
    late = (await counters.admit(request_id, "carol", "ops", LIMITS, 150, replace=early)).outcome
    assert isinstance(late, Reservation) and late.tokens == 0  # the tombstone answered
    assert await _held(doomed_redis.url, "carol", "ops") == (0, 0, 0, 0, 0, 0)
    await client.aclose()


async def test_a_release_that_was_never_sent_is_sent_again_once_redis_answers(
        doomed_redis: RedisProcess, frozen_client: aioredis.Redis) -> None:  # noqa: F811
    """A give-back that got no answer is retried in the background; before, it was logged and the slot
    stayed taken until its TTL. Here it is never written at all: the pool has no open connection, and a
    new one's handshake waits on the frozen Redis until the timeout."""
    from gateway.requests.usage import release_reservation

    counters = UsageCounters(frozen_client)
    held = (await counters.admit(rid(), "dave", "ops", LIMITS, 100)).outcome
    assert isinstance(held, Reservation)
    await frozen_client.connection_pool.disconnect()
    os.kill(doomed_redis.process.pid, signal.SIGSTOP)
    try:
        await release_reservation(counters, held)  # handed to the background, not raised
    finally:
        os.kill(doomed_redis.process.pid, signal.SIGCONT)
    await counters.aclose()
    assert (await _held(doomed_redis.url, "dave", "ops"))[2::3] == (0, 0)  # in flight: principal, team


async def test_a_give_back_that_never_goes_through_stops_at_its_bound(caplog) -> None:
    """Retried with a growing pause, then given up with an error: a Redis gone for good costs a bounded
    number of tries, not a task for ever."""
    from gateway.limits.later import LaterCalls

    tries = []

    async def call() -> None:
        tries.append(1)
        raise CountersUnavailable("usage counters unavailable: ConnectionError: refused")

    later = LaterCalls((CountersUnavailable,), give_up_after_s=0.2, first_pause_s=0.01, longest_pause_s=0.05)
    later.start("giving back x", call)
    await later.aclose(grace_s=5)
    assert len(later) == 0 and 3 <= len(tries) < 30
    assert any(r.levelname == "ERROR" and "gave up giving back x" in r.getMessage() for r in caplog.records)


async def test_no_more_give_backs_retry_at_once_than_the_bound(caplog) -> None:
    """A long outage refuses every request, each starting a give-back: past the bound they are dropped
    (logged), so the gateway does not keep a task and a connection attempt going per refused request."""
    from gateway.limits.later import LaterCalls

    async def call() -> None:
        raise CountersUnavailable("usage counters unavailable: ConnectionError: refused")

    later = LaterCalls((CountersUnavailable,), give_up_after_s=0.5, first_pause_s=0.01, longest_pause_s=0.05,
                       most=3)
    for i in range(5):
        later.start(f"giving back r{i}", call)
    assert len(later) == 3 and later.dropped == 2
    assert any(r.levelname == "ERROR" and "giving back r3 not retried" in r.getMessage() for r in caplog.records)
    await later.aclose(grace_s=5)
    assert len(later) == 0
