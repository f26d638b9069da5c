"""Reservations held past their request are ended: never recorded (probe s57 D2), or ended and never settled.

Real parts: the session's Redis (each test under a key prefix of its own)
and a fresh SQLite audit store. The gateway's death between reserving and
recording, with a real ``govgate serve`` killed by SIGKILL, is
``tests/e2e/test_stale_reservation_after_gateway_death.py``.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
import uuid
import pytest

from audit import AuditStore
from audit.db import make_engine
from gateway.limits import UsageCounters
from gateway.observability.metrics import REGISTRY
from gateway.requests.stale_reservations import (UNRECORDED, UNSETTLED, end_stale_reservations,
                                                 end_stale_reservations_forever, stale_after_s)
from tests.conftest_models import store  # noqa: F401 - fixture (a fresh migrated SQLite store)
from tests.gateway.test_usage_admit import client, counters  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))
LATER = T + 300  # older than UNRECORDED_AFTER_S (120 s)
LIMITS = {"principal": {"in_flight": 4}, "team": {"in_flight": 4}}


async def _reserve(counters: UsageCounters, principal: str = "alice", team: str | None = "research",
                   tokens: int = 100, at: float = T) -> str:
    request_id = uuid.uuid4().hex
    await counters.reserve(request_id, principal, team, LIMITS, tokens, now=at)
    return request_id


async def _held(counters: UsageCounters, principal: str = "alice", team: str | None = "research",
                at: float = LATER) -> tuple[dict, dict | None]:
    """(the principal's, the team's) in-flight count and tokens charged today."""
    usage = await counters.snapshot(principal, team, now=at)
    return tuple(None if scope is None else {"in_flight": scope["in_flight"], "tokens_today": scope["tokens_today"]}
                 for scope in (usage["principal"], usage["team"]))


async def _look(counters: UsageCounters, store: AuditStore, *, now: float, kind: str = UNRECORDED) -> list:
    """The reservations one look ended, each of ``kind``."""
    ended = await end_stale_reservations(counters, store, now=now)
    assert {k for k, _ in ended} <= {kind}, ended
    return [held for _, held in ended]


def _record(store: AuditStore, request_id: str, *, allow: bool, admitted: bool) -> None:
    store.append("request", request_id, principal="alice", team="research", model="tiny", policy_revision="r",
                 body={"decision": {"allow": allow}, "admission": {"admitted": admitted} if admitted else None})


async def test_a_reservation_no_entry_names_is_given_back_in_its_principals_and_teams_scope(
        counters, store, caplog) -> None:  # noqa: F811
    request_id = await _reserve(counters)
    assert await _held(counters) == ({"in_flight": 1, "tokens_today": 100}, {"in_flight": 1, "tokens_today": 100})
    counted = REGISTRY.get_sample_value("govgate_stale_reservations_total", {"kind": UNRECORDED}) or 0
    with caplog.at_level(logging.WARNING, logger="gateway.requests.stale_reservations"):
        given = await _look(counters, store, now=LATER)
    assert REGISTRY.get_sample_value("govgate_stale_reservations_total", {"kind": UNRECORDED}) == counted + 1
    assert [(h.request_id, h.principal_key, h.team_key, h.tokens, h.at) for h in given] == [
        (request_id, "alice", "research", 100, T)]
    assert await _held(counters) == ({"in_flight": 0, "tokens_today": 0}, {"in_flight": 0, "tokens_today": 0})
    assert f"the reservation of request {request_id} (principal alice, 100 tokens, 300 s old) was undone: " \
           "its request was never recorded" in caplog.text
    assert await counters.held(request_id, "alice", "research") is None
    assert await _look(counters, store, now=LATER + 60) == []  # given back once


async def test_an_ended_request_nobody_settled_is_settled_to_its_end_once_its_gateway_had_time(
        counters, store, caplog) -> None:  # noqa: F811
    """Its gateway died after the end was written and named nowhere, or Redis lost its settle (an append-only
    file keeps all but the last second)."""
    reserved_at = time.time() - 400  # (the audit store's times are the clock's: so are these)
    request_id, unrun = await _reserve(counters, at=reserved_at), await _reserve(counters, at=reserved_at)
    for admitted, kind, body in ((request_id, "completion", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
                                 (unrun, "cancelled", {})):  # (an end that records no usage: released)
        _record(store, admitted, allow=True, admitted=True)
        store.append(kind, admitted, principal="alice", team="research", model="tiny", policy_revision="r", body=body)
    assert await _look(counters, store, now=time.time()) == []  # just ended: its gateway's to settle
    counted = REGISTRY.get_sample_value("govgate_stale_reservations_total", {"kind": UNSETTLED}) or 0
    with caplog.at_level(logging.WARNING, logger="gateway.requests.stale_reservations"):
        ended = await _look(counters, store, now=time.time() + 61, kind=UNSETTLED)
    assert sorted(held.request_id for held in ended) == sorted([request_id, unrun])
    assert REGISTRY.get_sample_value("govgate_stale_reservations_total", {"kind": UNSETTLED}) == counted + 2
    assert "was settled to 7 tokens: its request ended completion and nobody settled it" in caplog.text
    # charged what its end records, on the day it was reserved
    assert await _held(counters, at=reserved_at + 1) == ({"in_flight": 0, "tokens_today": 7},
                                                         {"in_flight": 0, "tokens_today": 7})


async def test_a_young_reservation_and_an_admitted_requests_are_left_to_their_gateway(
        counters, store) -> None:  # noqa: F811
    young = await _reserve(counters, at=LATER - 60)
    admitted = await _reserve(counters)
    _record(store, admitted, allow=True, admitted=True)
    assert await _look(counters, store, now=LATER) == []
    assert (await _held(counters))[0] == {"in_flight": 2, "tokens_today": 200}
    assert (await counters.held(young, "alice", "research")).tokens == 100  # (the record with its team reads back)


async def test_a_denied_requests_early_reservation_its_gateway_did_not_undo_is_given_back(
        counters, store) -> None:  # noqa: F811
    denied = await _reserve(counters)
    _record(store, denied, allow=False, admitted=False)
    assert [h.request_id for h in await _look(counters, store, now=LATER)] == [denied]
    assert (await _held(counters))[1] == {"in_flight": 0, "tokens_today": 0}


async def test_without_a_team_and_from_before_records_named_it_the_principals_scope_is_given_back(
        counters, client, store) -> None:  # noqa: F811
    alone = await _reserve(counters, principal="bob", team=None)
    older = await _reserve(counters, principal="carol")
    # a record written before records named their team ('reserved tokens time')
    principal_hash = counters._keys_of("p", "carol")[1]
    record = (await client.hget(principal_hash, f"r:{older}")).decode()
    assert record.split(" ")[3:] == ["-", "research"]  # (no wait said: a counters without record_wait_s)
    await client.hset(principal_hash, f"r:{older}", " ".join(record.split(" ")[:3]))
    given = await _look(counters, store, now=LATER)
    assert sorted((h.principal_key, h.team_key) for h in given) == [("bob", None), ("carol", None)]
    assert await _held(counters, "bob", None) == ({"in_flight": 0, "tokens_today": 0}, None)
    # the team's slot of the older record stays until its TTL: the record did not say whose it was
    assert await _held(counters, "carol") == ({"in_flight": 0, "tokens_today": 0},
                                              {"in_flight": 1, "tokens_today": 100})


async def test_every_principal_is_read_across_pages_and_a_large_hash_to_its_end(
        counters, client, store) -> None:  # noqa: F811
    ids = [await _reserve(counters, principal=f"user-{n}", team=None) for n in range(5)]
    # a principal whose hash is too large for one HSCAN reply: its ended requests' records first
    big = await _reserve(counters, principal="busy", team=None)
    await client.hset(counters._keys_of("p", "busy")[1],
                      mapping={f"r:ended-{n}": f"settled 1 {round(T * 1e6)}" for n in range(3000)})
    given = await _look(counters, store, now=LATER)
    assert sorted(h.request_id for h in given) == sorted(ids + [big])


async def test_a_prefix_with_glob_characters_matches_only_its_own_keys(client, store) -> None:  # noqa: F811
    tag = uuid.uuid4().hex
    odd = UsageCounters(client, prefix=f"test:[{tag}]*?")
    other = UsageCounters(client, prefix=f"test:a{tag}]xyz")  # what '[...]*?' would match unescaped
    mine = await _reserve(odd)
    await _reserve(other)
    assert [h.request_id for h in await _look(odd, store, now=LATER)] == [mine]
    assert (await _held(other))[0]["in_flight"] == 1


async def test_records_whose_entries_cannot_be_read_are_kept_for_the_next_look(counters, tmp_path, caplog) -> None:
    await _reserve(counters)
    broken = AuditStore(make_engine(f"sqlite:///{tmp_path / 'never-migrated.db'}"))  # no table to read
    with caplog.at_level(logging.WARNING, logger="gateway.requests.stale_reservations"):
        assert await _look(counters, broken, now=LATER) == []
    assert "cannot read the entries of 1 old reservations" in caplog.text
    assert (await _held(counters))[0]["in_flight"] == 1


async def test_the_look_runs_only_while_its_gateway_holds_the_lock(counters, client, store) -> None:  # noqa: F811
    lock = f"test:look:{uuid.uuid4().hex}"
    await _reserve(counters)  # (made in 2024: older than any look's bar)
    await client.set(lock, "another gateway", px=60_000)
    look = asyncio.create_task(end_stale_reservations_forever(client, counters, store, interval_s=0.1, lock_key=lock))
    try:
        await asyncio.sleep(1.0)
        assert (await _held(counters))[0]["in_flight"] == 1  # another gateway holds the look
        await client.delete(lock)  # (its lock expires)
        for _ in range(300):
            if (await _held(counters))[0]["in_flight"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await _held(counters))[0]["in_flight"] == 0  # its lock expired: this one looked
    finally:
        look.cancel()
        await asyncio.gather(look, return_exceptions=True)


def test_the_bar_is_the_longest_an_admission_may_take_to_record_its_request_and_a_minute() -> None:
    assert stale_after_s(policy_wait_timeout_s=5, policy_timeout_s=0.5, database_busy_timeout_s=30) == 125.5
    assert stale_after_s(policy_wait_timeout_s=1, policy_timeout_s=0.5, database_busy_timeout_s=5) == 120
    assert stale_after_s(policy_wait_timeout_s=5, policy_timeout_s=0.5, database_busy_timeout_s=600) == 1265.5
