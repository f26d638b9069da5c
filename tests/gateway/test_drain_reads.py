"""A body still arriving when the gateway stops is not waited for: its read ends at the drain's begin and the
request is refused 503 ``shutting_down`` (probe p1 F2); a cancel that is not the drain's is left alone."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api_errors import ApiError
from gateway.drain import SHUTTING_DOWN, Drain

pytestmark = pytest.mark.anyio


async def _never() -> bytes:
    """A body whose end never comes (a client that stopped sending)."""
    await asyncio.Event().wait()
    return b""


async def test_a_read_under_way_when_the_drain_begins_is_ended_and_refused() -> None:
    drain = Drain(60.0)
    leave = drain.enter()  # the request counts in flight, as _serve counts it
    reading = asyncio.ensure_future(drain.read_unless_stopping(_never))
    await asyncio.sleep(0)  # the read has begun
    drain.begin()
    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(reading, 10)
    leave()
    assert refused.value.status == 503 and refused.value.code == SHUTTING_DOWN
    assert refused.value.headers["Retry-After"]
    assert drain.in_flight == 0


async def test_a_read_that_starts_during_the_drain_is_refused_without_reading() -> None:
    drain = Drain(60.0)
    drain.begin()
    read: list[bool] = []

    async def body() -> bytes:
        read.append(True)
        return b"{}"

    with pytest.raises(ApiError) as refused:
        await drain.read_unless_stopping(body)
    assert refused.value.code == SHUTTING_DOWN and read == []


async def test_a_read_that_ended_is_left_alone_by_a_later_begin() -> None:
    drain = Drain(60.0)

    async def body() -> bytes:
        await asyncio.sleep(0)
        return b"{}"

    assert await drain.read_unless_stopping(body) == b"{}"
    drain.begin()
    await asyncio.sleep(0.01)  # a stray cancel of this task would land here
    assert drain.draining


async def test_a_cancel_that_is_not_the_drain_goes_on() -> None:
    drain = Drain(60.0)
    reading = asyncio.ensure_future(drain.read_unless_stopping(_never))
    await asyncio.sleep(0)
    reading.cancel()  # the client's connection lost, uvicorn's own timeout: not a refusal
    with pytest.raises(asyncio.CancelledError):
        await reading
    drain.begin()  # nothing left to end
