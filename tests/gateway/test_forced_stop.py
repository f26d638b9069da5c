"""A forced stop's last calls (the closing checkpoint) run once each, and a hanging one cannot hold the exit."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.forced_stop import ForcedStop

pytestmark = pytest.mark.anyio


async def test_the_calls_run_once_and_a_removed_one_not_at_all() -> None:
    made: list[tuple[str, float]] = []

    async def call(name: str, within_s: float) -> None:
        made.append((name, within_s))

    stop = ForcedStop()
    stop.add("first", lambda s: call("first", s))
    forget = stop.add("gone", lambda s: call("gone", s))
    stop.add("last", lambda s: call("last", s))
    forget()
    await stop.run(within_s=30.0)
    await stop.run(within_s=30.0)  # once only
    assert [name for name, _ in made] == ["first", "last"]
    assert all(0 < within <= 30.0 for _, within in made)


async def test_a_hanging_call_is_given_up_within_the_bound_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def hang(within_s: float) -> None:
        await asyncio.Event().wait()

    async def fail(within_s: float) -> None:
        raise RuntimeError("database gone")

    stop = ForcedStop()
    stop.add("the failing one", fail)
    stop.add("the hanging one", hang)
    with caplog.at_level(logging.ERROR, logger="gateway.forced_stop"):
        await asyncio.wait_for(stop.run(within_s=0.5), 60)  # returns: the hang is cut at its bound
    text = caplog.text
    assert "the failing one failed" in text and "database gone" in text
    assert "the hanging one did not finish" in text
