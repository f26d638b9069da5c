"""The sweep that ends accepted requests whose gateway died before queueing them.

Real parts throughout: a migrated SQLite audit database and a Redis of this
module's own (the session's gateways retry pending terminal entries from the
session Redis and sweep the session database, and must not take these).
"Old" is reached by running a sweep with ``now`` moved past the lost-after
age instead of waiting minutes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from audit import AuditEntry, AuditStore, make_engine
from gateway.components import build_components
from gateway.limits import UsageCounters
from gateway.requests.lost_requests import (LOST_CODE, LostRequestSweep, lost_after_s, sweep_lost_requests,
                                            sweep_once)
from govgate.redis_server import RedisProcess
from tests.conftest_models import store  # noqa: F401 - fixture (a fresh migrated SQLite store)
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.sealing import Sealer

pytestmark = pytest.mark.anyio

LOST_AFTER_S = lost_after_s(request_timeout_s=15.0, generation_time_limit_s=2.0)
PROMPT = "lost-request prompt text"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="gg-lost-"))
    server = RedisProcess.start(folder, persist=False)
    yield server.url
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pending(redis_url: str) -> Iterator[PendingTerminals]:
    client = redis.Redis.from_url(redis_url)
    sealer = Sealer(os.urandom(32))
    yield PendingTerminals(client, horizon_s=86400, seal=sealer.seal, unseal=sealer.unseal)
    client.flushall()
    client.close()


@pytest.fixture
async def counters(redis_url: str) -> AsyncIterator[UsageCounters]:
    client = aioredis.Redis.from_url(redis_url)
    yield UsageCounters(client, prefix=f"lost-{uuid.uuid4().hex}")
    await client.aclose()


def sweep_of(store: AuditStore, pending: PendingTerminals) -> LostRequestSweep:
    return LostRequestSweep(store, pending, lost_after_s=LOST_AFTER_S, lookback_s=86400)


def request_entry(store: AuditStore, *, allow: bool = True, admitted: bool | None = True,
                  own_wait_s: float | None = None) -> AuditEntry:
    """A request entry shaped as admission writes it (prompt logged in full); ``own_wait_s``: its gateway's
    ``lost_after_s`` (None: an entry written before the field)."""
    admission: dict[str, Any] | None = None
    if admitted is not None:
        admission = {"admitted": admitted, "reserved_tokens": 40, "prompt_tokens": 8, "waiting": 0}
        if own_wait_s is not None:
            admission["lost_after_s"] = own_wait_s
    body = {"endpoint": "completions", "key_id": "k1", "roles": ["analyst"], "purpose": None, "stream": False,
            "params": {"max_tokens": 32}, "requested_max_tokens": 32,
            "decision": {"allow": allow, "reasons": [] if allow else [{"code": "denied", "message": "no"}],
                         "obligations": {"max_tokens": 32, "prompt_logging": "full"}},
            "admission": admission, "policy_input": {}, "prompt_logging": "full", "prompt": PROMPT}
    return store.append("request", uuid.uuid4().hex, principal="alice", team="research", model="tiny",
                        body=body, policy_revision="rev-1")


def after_lost_age(entry: AuditEntry, extra_s: float = 1.0) -> datetime:
    return entry.created_at + timedelta(seconds=LOST_AFTER_S + extra_s)


async def test_an_accepted_request_never_queued_ends_failed_gateway_lost(store, pending, counters, caplog):
    lost = request_entry(store)
    reservation = await counters.reserve(lost.request_id, "alice", "research", {"principal": {}, "team": {}}, 40)
    held = await counters.snapshot("alice", "research")
    assert held["principal"]["in_flight"] == 1 and held["team"]["tokens_today"] == 40

    with caplog.at_level(logging.WARNING, logger="gateway.requests.lost_requests"):
        ended = await sweep_once(sweep_of(store, pending), counters, after_lost_age(lost))

    assert ended == [lost]
    entries = store.entries_for(lost.request_id)
    assert [e.kind for e in entries] == ["request", "failed"]
    failed = entries[1]
    assert failed.body["error"]["code"] == LOST_CODE and "before queueing" in failed.body["error"]["message"]
    # nor does it claim more than the sweep knows: a job or end Redis lost ends the same way (probe s57 D3)
    assert "or its job or its end was lost with the gateway or with Redis" in failed.body["error"]["message"]
    assert (failed.principal, failed.team, failed.model, failed.policy_revision) == \
        (lost.principal, lost.team, lost.model, lost.policy_revision)
    assert PROMPT not in str(failed.body)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(lost.request_id in line for line in logged) and not any(PROMPT in line for line in logged)
    # It never ran: its tokens and its in-flight slot are given back.
    assert await counters.held(lost.request_id, "alice", "research") is None
    usage = await counters.snapshot("alice", "research")
    assert reservation.tokens == 40
    assert usage["principal"]["in_flight"] == 0 and usage["team"]["tokens_today"] == 0


async def test_requests_that_need_no_end_here_are_left_alone(store, pending, counters):
    ended = request_entry(store)
    store.append("completion", ended.request_id, principal="alice", team="research", model="tiny",
                 body={"output": "x"}, policy_revision="rev-1")
    denied = request_entry(store, allow=False, admitted=None)
    refused = request_entry(store, admitted=False)  # allowed, then over a limit: never admitted
    lost = request_entry(store)
    await asyncio.sleep(0.3)
    recent = request_entry(store)

    # Old enough for all but the last one: only the lost one is ended.
    assert await sweep_once(sweep_of(store, pending), counters, after_lost_age(recent, -0.1)) == [lost]
    assert [e.kind for e in store.entries_for(ended.request_id)] == ["request", "completion"]
    for untouched in (denied, refused, recent):
        assert store.entries_for(untouched.request_id) == [untouched]


async def test_an_end_waiting_in_redis_is_written_instead(store, pending, counters):
    lost = request_entry(store)
    pending.keep(PendingTerminal(kind="completion", request_id=lost.request_id, principal="alice",
                                 team="research", model="tiny", body={"output": "kept"}, policy_revision="rev-1"))

    assert await sweep_once(sweep_of(store, pending), counters, after_lost_age(lost)) == []
    assert [e.kind for e in store.entries_for(lost.request_id)] == ["request", "completion"]
    assert not pending.holds(lost.request_id)


async def test_sweeping_again_or_from_another_gateway_writes_nothing_twice(store, pending, counters):
    entries = [request_entry(store, allow=allow, admitted=True if allow else None)
               for allow in (False, True, False, True, True, False)]
    lost = [e for e in entries if e.body["decision"]["allow"]]
    now = after_lost_age(entries[-1])
    # Pages of two, one page a sweep: the window is finished over several sweeps, past the denied ones.
    first = LostRequestSweep(store, pending, lost_after_s=LOST_AFTER_S, lookback_s=86400, page=2,
                             pages_per_sweep=1)
    ended = []
    for _ in range(5):
        ended += await sweep_once(first, counters, now)
    assert ended == lost
    head = store.head().seq
    assert await sweep_once(first, counters, now + timedelta(seconds=30)) == []
    assert await sweep_once(sweep_of(store, pending), counters, now) == []  # another gateway, same window
    assert store.head().seq == head
    for entry in entries:
        kinds = ["request", "failed"] if entry in lost else ["request"]
        assert [e.kind for e in store.entries_for(entry.request_id)] == kinds


async def test_a_request_of_a_gateway_that_waits_longer_is_swept_only_after_its_own_wait(store, pending,
                                                                                         counters):
    """A replica with a shorter request timeout ended another's live requests ``gateway_lost`` (probe s57 D1):
    the sweep now waits for the longer of its own wait and the one the request entry records."""
    longer = request_entry(store, own_wait_s=LOST_AFTER_S + 100)
    shorter = request_entry(store, own_wait_s=1.0)  # its gateway's own sweep is quicker: not this one's business
    ends_meanwhile = request_entry(store, own_wait_s=LOST_AFTER_S + 100)
    sweep = sweep_of(store, pending)

    assert await sweep_once(sweep, counters, after_lost_age(ends_meanwhile)) == [shorter]
    for waiting in (longer, ends_meanwhile):
        assert store.entries_for(waiting.request_id) == [waiting]  # still running, by its own gateway's count
    store.append("completion", ends_meanwhile.request_id, principal="alice", team="research", model="tiny",
                 body={"output": "x"}, policy_revision="rev-1")
    assert await sweep_once(sweep, counters, after_lost_age(longer, 99.0 - 1.0)) == []  # not yet
    assert await sweep_once(sweep, counters, after_lost_age(ends_meanwhile, 101.0)) == [longer]
    assert [e.kind for e in store.entries_for(longer.request_id)] == ["request", "failed"]
    assert [e.kind for e in store.entries_for(ends_meanwhile.request_id)] == ["request", "completion"]
    assert await sweep_once(sweep, counters, after_lost_age(ends_meanwhile, 200.0)) == []


async def test_the_loop_outlives_a_database_it_cannot_read(tmp_path, pending, counters, caplog):
    unmigrated = AuditStore(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    sweep = LostRequestSweep(unmigrated, pending, lost_after_s=0.0, lookback_s=60)
    def failures() -> int:
        return sum("looking for lost requests failed" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="gateway.requests.lost_requests"):
        task = asyncio.create_task(sweep_lost_requests(sweep, counters, interval_s=0.05))
        # Polled, not a fixed sleep: on a starved machine (CI with a CPU burner) the sweep thread's
        # first failures can take longer than half a second; the loop must still be alive after them.
        deadline = asyncio.get_running_loop().time() + 20.0
        while failures() < 2 and asyncio.get_running_loop().time() < deadline and not task.done():
            await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    unmigrated.engine.dispose()
    assert failures() >= 2
    # a store it cannot read is said in one line with its reason, no traceback each sweep
    said = [r for r in caplog.records if "looking for lost requests failed" in r.getMessage()]
    assert all(r.exc_info is None and "audit read failed" in r.getMessage() for r in said), said[0].getMessage()


async def test_every_gateway_runs_the_sweep_while_it_is_up(settings):
    def sweeps() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "govgate-lost-requests"]

    async with build_components(settings):
        running = sweeps()
        assert len(running) == 1 and not running[0].done()
    assert running[0].done() and sweeps() == []


async def test_the_request_runner_waits_the_configured_timeout_grace(settings):
    """``GOVGATE_TIMEOUT_GRACE_S`` reaches the runner that waits out a timed-out request's worker
    (gateway/requests/timeouts.py); the default is the 10 s it was as a constant."""
    async with build_components(settings.with_(timeout_grace_s=2.5)) as components:
        assert components.completions.runner.stop_grace_s == 2.5
    async with build_components(settings) as components:
        assert components.completions.runner.stop_grace_s == 10.0
