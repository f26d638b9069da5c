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


class _App:
    """An ASGI app that reads through whatever ``receive`` it is given, as a handler's ``request.body()`` does."""

    def __init__(self, reads: int) -> None:
        self.reads = reads
        self.got: list[object] = []

    async def __call__(self, scope, receive, send) -> None:
        try:
            for _ in range(self.reads):
                self.got.append(await receive())
        except ApiError as error:
            self.got.append(error)


def _scope(**headers: str) -> dict:
    return {"type": "http", "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


async def test_any_endpoint_s_body_read_during_the_drain_is_refused_unread() -> None:
    """The wrapper every request passes (``gateway/drain_reads.py``), not a handler's own code (probe q1 F4)."""
    from gateway.drain_reads import DrainEndsBodyReads

    drain = Drain(60.0)
    drain.begin()
    asked: list[bool] = []

    async def receive() -> dict:
        asked.append(True)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    app = _App(reads=1)
    await DrainEndsBodyReads(app, drain)(_scope(content_length="2"), receive, None)
    assert isinstance(app.got[0], ApiError) and app.got[0].code == SHUTTING_DOWN and asked == []
    bodiless = _App(reads=1)  # a GET: not wrapped, so the pages and /readyz are served while it drains
    await DrainEndsBodyReads(bodiless, drain)(_scope(content_length="0"), receive, None)
    assert bodiless.got == [{"type": "http.request", "body": b"{}", "more_body": False}]


async def test_a_wait_on_receive_after_the_whole_body_is_not_ended_by_the_drain_s_begin() -> None:
    """A completion waiting for its client's disconnect is in flight: the cut ends it, not the begin."""
    from gateway.drain_reads import DrainEndsBodyReads

    drain = Drain(60.0)
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    app = _App(reads=2)
    running = asyncio.ensure_future(DrainEndsBodyReads(app, drain)(_scope(content_length="2"), receive, None))
    while not app.got:
        await asyncio.sleep(0.01)
    drain.begin()
    await asyncio.sleep(0.05)  # a cancel by the begin would land here
    assert not running.done()
    gone.set()
    await asyncio.wait_for(running, 10)
    assert app.got[1] == {"type": "http.disconnect"}
