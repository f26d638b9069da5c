"""A forced stop hurries the requests the drain's cut ended (probe q1 F1): what waits for a worker's end
stops waiting, and the ends the cut called are called again (a stream given a grace ends it)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.drain import Drain

pytestmark = pytest.mark.anyio


async def test_a_forced_run_hurries_and_calls_the_ends_again() -> None:
    drain = Drain(60.0)
    ends: list[str] = []
    leave = drain.enter(lambda: ends.append("end"))
    hurried = asyncio.ensure_future(drain.wait_hurried())
    running = asyncio.ensure_future(drain.run(forced=lambda: True))
    await asyncio.wait_for(hurried, 10)  # the forced run hurried the drain
    assert drain.is_cut and drain.hurried and ends == ["end", "end"], ends  # the cut's call, and the hurry's
    leave()
    await asyncio.wait_for(running, 10)


async def test_a_graceful_run_does_not_hurry() -> None:
    drain = Drain(0.0)
    ends: list[str] = []
    leave = drain.enter(lambda: ends.append("end"))
    running = asyncio.ensure_future(drain.run())
    while not drain.is_cut:
        await asyncio.sleep(0.01)
    leave()
    await asyncio.wait_for(running, 30)
    assert not drain.hurried and ends == ["end"]
