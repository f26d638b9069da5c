"""The request path's thread pool: results, errors, and a cancelled caller that still sees its call end."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from gateway.requests.blocking_calls import BlockingCalls
from tests.gateway.cancel_turns import cancel_and_turn

pytestmark = pytest.mark.anyio


async def test_a_call_runs_on_another_thread_and_returns_its_value() -> None:
    calls = BlockingCalls(2)
    try:
        loop_thread = threading.get_ident()
        ran_on, value = await calls.run(lambda: (threading.get_ident(), 42))
        assert value == 42
        assert ran_on != loop_thread
    finally:
        await calls.aclose()


async def test_a_call_that_raises_raises_in_the_caller() -> None:
    calls = BlockingCalls(1)

    def fail() -> None:
        raise ValueError("refused")

    try:
        with pytest.raises(ValueError, match="refused"):
            await calls.run(fail)
    finally:
        await calls.aclose()


async def test_a_cancelled_caller_waits_for_its_running_call_then_is_cancelled() -> None:
    calls = BlockingCalls(1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)
        finished.set()

    try:
        task = asyncio.create_task(calls.run(slow))
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # the cancel waits for the call, as anyio's to_thread does
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()
    finally:
        release.set()
        await calls.aclose()


async def test_a_caller_in_a_cancelled_anyio_scope_waits_for_its_call_however_often_it_is_cancelled() -> None:
    """anyio cancels a task inside a cancelled scope again on every turn of the loop; the second cancel ended
    the wait for the call (a terminal entry kept pending was then half-known to its request)."""
    calls = BlockingCalls(1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def slow() -> None:
        started.set()
        release.wait(10)
        finished.set()

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            await calls.run(slow)
        seen.append(finished.is_set())  # out of the scope: was the call over?

    try:
        scope = anyio.CancelScope()
        task = asyncio.create_task(caller(scope))
        assert await asyncio.to_thread(started.wait, 10)
        await cancel_and_turn(scope, task, "the cancelled caller left while its call was still running")
        release.set()
        await task
        assert seen == [True]
    finally:
        release.set()
        await calls.aclose()


async def test_a_call_still_queued_when_its_caller_is_cancelled_runs_all_the_same() -> None:
    """An audit append queued behind others is not dropped by a cancel: it runs, then the cancel is raised."""
    calls = BlockingCalls(1)
    release = threading.Event()
    ran: list[str] = []
    try:
        blocker = asyncio.create_task(calls.run(lambda: release.wait(10)))
        queued = asyncio.create_task(calls.run(lambda: ran.append("queued")))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.sleep(0.05)
        assert not queued.done() and ran == []
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert ran == ["queued"]
        assert await blocker is True
    finally:
        release.set()
        await calls.aclose()


async def test_aclose_waits_for_the_calls_still_running_and_refuses_new_ones() -> None:
    calls = BlockingCalls(1)
    release, finished = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(10)
        finished.set()

    task = asyncio.create_task(calls.run(slow))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(calls.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing
    assert finished.is_set()
    await task
    with pytest.raises(RuntimeError):
        await calls.run(lambda: None)
