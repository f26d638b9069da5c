"""An admission slow enough that its reservation was taken for stale is refused, not served uncounted.

Probe s58 E F2: a gateway paused between reserving and recording a request,
past the stale-reservation look's wait, recorded and served it after the
look had undone its reservation; the request ran uncounted. Real parts: the
session's Redis (a key prefix of the test's own) and a fresh SQLite audit
store; the gateway's pause is the reservation's time set back.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from audit import AuditStore
from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.limits import UsageCounters
from gateway.requests.kept_reservation import CODE, refuse_if_given_back
from gateway.requests.request_log import RequestLog
from gateway.requests.stale_reservations import end_stale_reservations
from gateway.requests.ticket import Ticket
from tests.conftest_models import store  # noqa: F401 - fixture (a fresh migrated SQLite store)
from tests.gateway.test_usage_admit import client  # noqa: F401 - fixture (the session's Redis)
from workers.contract.jobs import GenerateJob
from workers.contract.privacy import Digester
from workers.contract.sampling import SamplingParams

pytestmark = pytest.mark.anyio

WAIT_S = 130.0  # the gateway's record_wait_s


async def _reserved(counters: UsageCounters, *, age_s: float) -> Ticket:
    """A ticket as admission leaves it, its reservation made ``age_s`` ago (its entry not written yet)."""
    request_id = uuid.uuid4().hex
    reservation = await counters.reserve(request_id, "alice", "research", {"principal": {}, "team": {}}, 40,
                                         now=time.time() - age_s)
    job = GenerateJob(request_id=request_id, model="tiny", endpoint="completions", params=SamplingParams(8),
                      principal="alice", team="research", policy_revision="rev", prompt="Once")
    return Ticket(request_id=request_id, principal=Principal("alice", "research", ("analyst",), "k1"), model="tiny",
                  created=int(time.time()), job=job, reservation=reservation)


def _record(store: AuditStore, ticket: Ticket) -> None:  # noqa: F811 - (the fixture's name)
    store.append("request", ticket.request_id, principal="alice", team="research", model="tiny",
                 policy_revision="rev", body={"decision": {"allow": True}, "admission": {"admitted": True}})


@pytest.fixture
async def parts(client, store):  # noqa: F811
    counters = UsageCounters(client, prefix=f"test:{uuid.uuid4().hex}", record_wait_s=WAIT_S)
    request_log = RequestLog(store, current_revision=lambda: "rev", digester=Digester(os.urandom(32)))
    yield counters, request_log
    await request_log.aclose()


async def test_a_slow_admission_whose_reservation_was_given_back_is_refused_and_ended(
        parts, store) -> None:  # noqa: F811
    counters, request_log = parts
    # admissions whose entries are still being written (a paused gateway, a locked database)
    waiting, paused = await _reserved(counters, age_s=WAIT_S - 30), await _reserved(counters, age_s=WAIT_S + 10)
    # a gateway whose own wait is shorter (60 s) waits for the one each record keeps (130 s)
    ended = await end_stale_reservations(counters, store, after_s=60)
    assert [held.request_id for _, held in ended] == [paused.request_id]
    for ticket in (waiting, paused):
        _record(store, ticket)  # written after all
    await refuse_if_given_back(counters, request_log, waiting)  # still held: it goes on
    with pytest.raises(ApiError) as refused:
        await refuse_if_given_back(counters, request_log, paused)
    assert (refused.value.status, refused.value.code) == (503, CODE)
    end = store.terminal_for(paused.request_id)
    assert end is not None and end.kind == "failed" and end.body["error"]["code"] == CODE
    assert store.terminal_for(waiting.request_id) is None


async def test_a_quick_admission_does_not_ask(parts, store) -> None:  # noqa: F811
    counters, request_log = parts
    quick = await _reserved(counters, age_s=WAIT_S / 2 - 5)
    await counters.undo(quick.reservation)  # (given back by whatever: a quick admission does not look)
    _record(store, quick)
    await refuse_if_given_back(counters, request_log, quick)
    assert store.terminal_for(quick.request_id) is None
