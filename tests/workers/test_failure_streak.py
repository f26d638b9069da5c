"""A worker that fails every job for a reason of its own marks itself, and gateways read the mark (real Redis).

``workers/failure_streak.py`` writes, ``workers/contract/failing.py`` is the
protocol, ``gateway/observability/cluster.py`` reads it beside the live
workers. The served path (a worker with another payload key) is in
``tests/e2e/test_privacy_leaks.py``.
"""

from __future__ import annotations

import time
import uuid

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from gateway.observability.cluster import read_cluster
from workers.contract.failing import FAILING_AFTER, FAILING_KEY, READ_SCRIPT, holding_marks
from workers.contract.jobs import STATUS_CANCELLED, STATUS_COMPLETED, STATUS_FAILED, STATUS_TIMED_OUT
from workers.contract.liveness import BEAT_SCRIPT, WORKERS_KEY, member, slot_members
from workers.failure_streak import FailureStreak

UNREADABLE = {"code": "payload_unreadable", "message": "the worker could not unseal the job (payload key mismatch)"}
AUDIT = {"code": "audit_unavailable", "message": "the audit store cannot be written"}


@pytest.fixture
def client(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    yield connection
    connection.delete(FAILING_KEY)
    connection.close()


def marks(client: redis.Redis) -> dict[str, str]:
    return holding_marks(client.eval(READ_SCRIPT, 1, FAILING_KEY))


def a_member(model: str = "m") -> str:
    return member(model, f"{model}.{uuid.uuid4().int % 10**6}@host")


def test_own_failures_in_a_row_mark_the_worker_and_a_completed_job_clears_it(client):
    who = a_member()
    streak = FailureStreak(client, who)
    for _ in range(FAILING_AFTER - 1):
        streak.ended(STATUS_FAILED, UNREADABLE)
    assert marks(client) == {}  # not yet: one bad job is not a broken worker
    streak.ended(STATUS_FAILED, UNREADABLE)
    assert marks(client) == {who: "payload_unreadable: the worker could not unseal the job (payload key mismatch)"}
    streak.ended(STATUS_FAILED, AUDIT)  # renewed, with the latest reason
    assert marks(client) == {who: "audit_unavailable: the audit store cannot be written"}
    streak.ended(STATUS_COMPLETED)
    assert marks(client) == {} and client.hlen(FAILING_KEY) == 0 and streak.run == 0


def test_ends_the_job_brought_neither_count_nor_break_the_run(client):
    who = a_member()
    streak = FailureStreak(client, who)
    streak.ended(STATUS_FAILED, UNREADABLE)
    for status, error in ((STATUS_FAILED, {"code": "worker_error", "message": "boom"}),
                          (STATUS_FAILED, {"code": "generation_failed", "message": ""}),
                          (STATUS_CANCELLED, None), (STATUS_TIMED_OUT, {"code": "timed_out"}), ("put_back", {})):
        streak.ended(status, error)
    assert streak.run == 1 and marks(client) == {}
    for _ in range(FAILING_AFTER - 1):
        streak.ended(STATUS_FAILED, UNREADABLE)
    assert list(marks(client)) == [who]


def test_completed_jobs_alone_send_nothing(client, redis_server):
    streak = FailureStreak(client, a_member())
    before = client.info("stats")["total_commands_processed"]
    for _ in range(5):
        streak.ended(STATUS_COMPLETED)
    # The INFO itself is the one command counted: the usual path writes nothing.
    assert client.info("stats")["total_commands_processed"] - before == 1


def test_a_mark_lapses_unless_renewed_and_lapsed_marks_are_dropped(client):
    old, new = a_member(), a_member()
    FailureStreak(client, old, after=1, ttl_s=1).ended(STATUS_FAILED, UNREADABLE)
    assert list(marks(client)) == [old]
    time.sleep(2.1)  # Redis's clock counts whole seconds: the mark held until at most 2 s from now
    assert marks(client) == {}
    assert client.hexists(FAILING_KEY, old)  # still there, lapsed, until the next mark
    FailureStreak(client, new, after=1).ended(STATUS_FAILED, AUDIT)
    assert client.hkeys(FAILING_KEY) == [new.encode()]


def test_a_long_reason_is_kept_on_one_bounded_line(client):
    who = a_member()
    FailureStreak(client, who, after=1).ended(STATUS_FAILED, {"code": "audit_unavailable",
                                                              "message": "line one\nline two " + "x" * 1000})
    reason = marks(client)[who]
    assert reason.startswith("audit_unavailable: line one line two x") and len(reason) == 300


def test_a_redis_that_cannot_take_the_mark_leaves_the_streak_counting(caplog):
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    streak = FailureStreak(gone, a_member(), after=1)
    streak.ended(STATUS_FAILED, UNREADABLE)
    streak.ended(STATUS_COMPLETED)
    assert streak.run == 0
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "workers.failure_streak"][-2:] == [
        "could not write this worker's failing mark", "could not clear this worker's failing mark"]


def test_the_cluster_read_counts_the_marks_of_live_workers_only(client, redis_server):
    model, other = f"fm-{uuid.uuid4().hex[:6]}", f"fo-{uuid.uuid4().hex[:6]}"
    live = [member(model, f"{model}.{n}@host") for n in (1, 2)]
    dead = member(model, f"{model}.9@host")  # marked, but it beats no more
    for who in live:
        client.eval(BEAT_SCRIPT, 1, WORKERS_KEY, who, 30)
    two_slots = slot_members(other, f"{other}.3@host", slots=2)
    client.eval(BEAT_SCRIPT, 1, WORKERS_KEY, two_slots[0], 30, *two_slots[1:])
    try:
        for who in (live[0], dead, *two_slots):  # a further slot's member is not a worker
            FailureStreak(client, who, after=1).ended(STATUS_FAILED, UNREADABLE)

        async def read():
            async with aioredis.Redis.from_url(redis_server.url) as reader:
                return await read_cluster(reader, [model, other])

        state = anyio.run(read)
        assert state.workers == {model: 2, other: 1}
        assert {m: f.workers for m, f in state.failing.items()} == {model: 1, other: 1}
        assert state.serving(model) == 1 and state.serving(other) == 0
        assert state.failing[other].reason.startswith("payload_unreadable: ")
    finally:
        client.zrem(WORKERS_KEY, *live, *two_slots)
