"""Stopping background tasks: a task that shrugs off a cancel is cancelled again; one that never ends is left.

The stubborn task here is a named stand-in for what redis-py does on
Python 3.11 when a cancel meets its read timeout (the cancel is lost and the
read returns "no message"); tests/gateway/test_key_change_listener.py has the
same race against a real Redis.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.task_stop import stop_task, stop_tasks

pytestmark = pytest.mark.anyio


class LosesCancels:
    """Swallows cancels, as a read that timed out at the same moment would, until told to obey."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.seen = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.seen += 1
                if self.seen > self.lost:
                    raise
                asyncio.current_task().uncancel()


async def test_a_task_that_loses_cancels_is_cancelled_until_it_ends():
    body = LosesCancels(lost=3)
    task = asyncio.create_task(body.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, within_s=30), timeout=60)
    assert task.cancelled() and body.seen == 4


async def test_a_task_that_never_ends_is_left_and_named_after_the_bound(caplog):
    body = LosesCancels(lost=10**9)
    stubborn = asyncio.create_task(body.run(), name="stubborn-listener")
    obedient = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="gateway.task_stop"):
        await asyncio.wait_for(stop_tasks([stubborn, obedient, None], within_s=0.5), timeout=30)
    assert obedient.cancelled() and not stubborn.done() and body.seen >= 2
    assert "stubborn-listener" in caplog.text
    body.lost = 0  # let it go, so the test's loop closes clean
    await asyncio.wait_for(stop_task(stubborn), timeout=30)
    assert stubborn.cancelled()


async def test_failures_of_stopped_tasks_are_collected_not_reported_later():
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop_tasks([task])
    assert task.done() and isinstance(task.exception(), RuntimeError)
