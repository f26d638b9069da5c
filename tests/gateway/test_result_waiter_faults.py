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
