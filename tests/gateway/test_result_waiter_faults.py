"""The result waiter under a Redis that dies mid-request (real Redis, SIGKILLed).

Only designed failures may leave ``ResultWaiter.expect``: no result in time
(``ResultTimeout``) or Redis gone (``RedisError``/``OSError``). Anything else
reaches the client as a 500 (the soak's ``errors_designed``).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.dispatch import ResultTimeout, ResultWaiter
from govgate.redis_server import RedisProcess
from workers.contract.sealing import Sealer

pytestmark = pytest.mark.anyio


async def test_only_designed_failures_leave_expect_when_redis_is_killed(short_tmp):
    redis_dir = short_tmp("gg-rw-")
    server = RedisProcess.start(redis_dir, persist=False)
    # As gateway/components.py builds it.
    pool = aioredis.BlockingConnectionPool.from_url(server.url, max_connections=50, timeout=5, socket_timeout=10,
                                                    socket_connect_timeout=5)
    client = aioredis.Redis(connection_pool=pool)
    waiter = ResultWaiter(client, Sealer(os.urandom(32)))
    await waiter.start()
    undesigned: list[BaseException] = []
    designed = 0
    stop = asyncio.Event()

    async def requests(n: int) -> None:
        nonlocal designed
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with waiter.expect(f"rw-{n}-{i}", stream=i % 2 == 0) as pending:
                    await asyncio.sleep(0.001)
                    await pending.get(0.01)
            except (ResultTimeout, RedisError, OSError):
                designed += 1
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                undesigned.append(exc)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(requests(n)) for n in range(16)]
    try:
        for _ in range(6):  # the race is narrow: each kill hit it about once or twice before the fix
            await asyncio.sleep(0.7)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            await asyncio.sleep(0.5)
            server = RedisProcess.start(redis_dir, persist=False)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await waiter.aclose()
        await client.aclose()
        server.stop()
    assert designed > 0
    assert not undesigned, [f"{type(e).__name__}: {e}" for e in undesigned[:5]]


async def test_after_a_reconnect_waits_whose_request_has_an_end_in_the_audit_log_are_answered(short_tmp, caplog):
    """The audit log is asked (the stand-in callback here is the gateway's ``terminal_for`` look) after each
    reconnect which waits ended while Redis lost their outcome; those get ``ENDED_UNHEARD``, stream or not,
    the others wait on; a look that fails (the database down too) is logged and the next one tried."""
    from gateway.dispatch.results import ENDED_UNHEARD

    redis_dir = short_tmp("gg-re-")
    server = RedisProcess.start(redis_dir, persist=False)
    client = aioredis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=5)
    ended: set[str] = set()
    asked: list[list[str]] = []

    async def recorded_ends(request_ids: list[str]) -> set[str]:
        asked.append(sorted(request_ids))
        if len(asked) == 1:
            raise RuntimeError("database down")
        return ended & set(request_ids)

    waiter = ResultWaiter(client, Sealer(os.urandom(32)), recorded_ends=recorded_ends)
    await waiter.start()
    try:
        async with waiter.expect("ended-plain") as plain, waiter.expect("ended-stream", stream=True) as stream, \
                waiter.expect("still-running") as running:
            ended.update({"ended-plain", "ended-stream"})
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            server = RedisProcess.start(redis_dir, persist=False)
            with caplog.at_level("WARNING", logger="gateway.dispatch.results"):
                assert await plain.get(30) == ENDED_UNHEARD  # the first look failed; the one 2 s later answers
                events = [event async for event in stream.events(5)]
            assert events == [ENDED_UNHEARD]
            with pytest.raises(ResultTimeout):
                await running.get(0.2)
        assert asked[0] == ["ended-plain", "ended-stream", "still-running"]
        assert "cannot ask the audit log" in caplog.text and "ended while Redis lost" in caplog.text
    finally:
        await waiter.aclose()
        await client.aclose()
        server.stop()
