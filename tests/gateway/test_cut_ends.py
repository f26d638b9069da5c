"""The stop's wait for the ends of the requests its drain cut (``gateway/cut_ends.py``), on a real audit store."""

from __future__ import annotations

import time
import uuid

import pytest

from gateway.cut_ends import wait_for_cut_ends

pytestmark = pytest.mark.anyio


def _request(audit_store, *, ended: bool) -> str:
    request_id = uuid.uuid4().hex
    common = {"principal": "cut-ends", "team": None, "model": "tiny", "policy_revision": "r"}
    audit_store.append("request", request_id, body={"decision": {"allow": True}}, **common)
    if ended:
        audit_store.append("cancelled", request_id, body={"error": {"code": "cancelled"}}, **common)
    return request_id


async def test_ends_already_recorded_are_not_waited_for(audit_store) -> None:
    ended = [_request(audit_store, ended=True) for _ in range(3)]
    started = time.monotonic()
    assert await wait_for_cut_ends(ended, audit_store, bound_s=30) == set()
    assert time.monotonic() - started < 10  # found at the first look, not after the bound


async def test_an_end_that_never_comes_is_waited_for_within_the_bound_only(audit_store) -> None:
    ended, open_ = _request(audit_store, ended=True), _request(audit_store, ended=False)
    started = time.monotonic()
    assert await wait_for_cut_ends([ended, open_], audit_store, bound_s=0.6) == {open_}
    assert 0.6 <= time.monotonic() - started < 10


async def test_an_end_recorded_while_waiting_ends_the_wait(audit_store) -> None:
    import anyio

    request_id = _request(audit_store, ended=False)

    async def record_later() -> None:
        await anyio.sleep(0.5)
        audit_store.append("cancelled", request_id, body={"error": {"code": "cancelled"}}, principal="cut-ends",
                           team=None, model="tiny", policy_revision="r")

    async with anyio.create_task_group() as group:
        group.start_soon(record_later)
        started = time.monotonic()
        assert await wait_for_cut_ends([request_id], audit_store, bound_s=30) == set()
    assert time.monotonic() - started < 15


async def test_a_forced_stop_does_not_wait(audit_store) -> None:
    request_id = _request(audit_store, ended=False)
    started = time.monotonic()
    assert await wait_for_cut_ends([request_id], audit_store, bound_s=30, hurried=lambda: True) == {request_id}
    assert time.monotonic() - started < 10
