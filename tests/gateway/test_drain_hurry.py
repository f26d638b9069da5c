"""A forced stop hurries the requests the drain's cut ended (probe q1 F1): what waits for a worker's end
stops waiting, and the ends the cut called are called again (a stream given a grace ends it)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.drain import Drain




@pytest.mark.anyio
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


@pytest.mark.anyio
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


def test_the_stop_s_line_says_none_in_flight_when_none_is(caplog: pytest.LogCaptureFixture) -> None:
    """Probe q1 (cosmetic): with nothing in flight the line said "0 in flight get up to 20s to finish"."""
    import logging

    with caplog.at_level(logging.INFO, logger="gateway.drain"):
        Drain(20.0).begin()
        busy = Drain(20.0)
        busy.enter()
        busy.begin()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["stopping: no new requests; none in flight",
                     "stopping: no new requests; 1 in flight get up to 20s to finish (GOVGATE_DRAIN_S)"], lines
