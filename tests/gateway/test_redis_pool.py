"""The gateway's Redis pool lends a free connection without redis-py's locks, and otherwise behaves as redis-py's
(``gateway/redis_pool.py``): waiting when none is free, keeping a waiter's turn, reconnecting a dirty or
dropped connection."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis as redis_sync
import redis.asyncio as aioredis
import redis.asyncio.connection as redis_connection
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.components import gateway_redis
from gateway.redis_pool import LeanBlockingConnectionPool
from gateway.resp_pack import fast_packing
from gateway.resp_send import immediate_sending


def _pool(url: str, **options) -> LeanBlockingConnectionPool:
    options = {"max_connections": 8, "timeout": 5, "socket_timeout": 10, **options}
    return immediate_sending(fast_packing(LeanBlockingConnectionPool.from_url(url, **options)))


def test_the_gateway_uses_it(settings):
    client = gateway_redis(dataclasses.replace(settings, redis_max_connections=7, redis_timeout_s=2.5))
    try:
        assert isinstance(client.connection_pool, LeanBlockingConnectionPool)
        assert client.connection_pool.max_connections == 7
        assert client.connection_pool.timeout == 5  # waits for a free connection, never fails at the limit at once
        # GOVGATE_REDIS_TIMEOUT_S: an unanswered call fails (closed) after it; a handshake never waits longer
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 2.5
        assert client.connection_pool.connection_kwargs["socket_connect_timeout"] == 2.5
    finally:
        asyncio.run(client.aclose())


def test_a_free_connection_is_lent_and_taken_back_the_short_way(redis_server, monkeypatch):
    """With a connection free and no one waiting, neither the condition nor the base pool's lock is taken,
    and redis-py's recorder is not called (redis-py's own pool calls it on every lend and return)."""
    recorded: list[object] = []

    async def record(*args, **kwargs) -> None:
        recorded.append(kwargs.get("connection_state"))

    monkeypatch.setattr(redis_connection, "record_connection_count", record)

    async def main() -> None:
        pool = _pool(redis_server.url)
        client = aioredis.Redis(connection_pool=pool)
        await client.set("rp:short", "1")  # the first borrow makes the connection: redis-py's way
        recorded.clear()
        for _ in range(5):
            assert await client.get("rp:short") == b"1"
        assert recorded == []
        assert len(pool._available_connections) == 1 and not pool._in_use_connections
        await client.aclose()

    asyncio.run(main())


def test_a_borrower_waits_when_none_is_free_and_gets_the_next_returned(redis_server):
    async def main() -> None:
        pool = _pool(redis_server.url, max_connections=2)
        first, second = await pool.get_connection(), await pool.get_connection()
        third = asyncio.ensure_future(pool.get_connection())
        await asyncio.sleep(0.05)
        assert not third.done()  # waiting, as redis-py's blocking pool waits
        late = asyncio.ensure_future(pool.get_connection())
        await asyncio.sleep(0.05)
        await pool.release(first)
        assert await asyncio.wait_for(third, 5) is first  # the first waiter's turn, not the later one's
        assert not late.done()
        await pool.release(second)
        assert await asyncio.wait_for(late, 5) is second
        await pool.release(third.result())
        await pool.release(late.result())
        assert not pool._in_use_connections
        await pool.disconnect()

    asyncio.run(main())


def test_a_borrower_gives_up_after_the_pool_timeout(redis_server):
    async def main() -> None:
        pool = _pool(redis_server.url, max_connections=1, timeout=0.2)
        held = await pool.get_connection()
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await pool.get_connection()
        await pool.release(held)
        again = await pool.get_connection()
        assert again is held
        await pool.release(again)
        await pool.disconnect()

    asyncio.run(main())


def test_a_connection_with_an_unread_reply_is_reconnected_before_it_is_lent_again(redis_server):
    """A reply left unread (a caller cancelled between send and read) must not answer the next command."""
    async def main() -> None:
        pool = _pool(redis_server.url)
        client = aioredis.Redis(connection_pool=pool)
        await client.set("rp:dirty", "right")
        connection = await pool.get_connection()
        await connection.send_command("ECHO", "stale")
        await asyncio.sleep(0.05)  # the stale reply arrives in the connection's buffer
        writer = connection._writer
        await pool.release(connection)
        assert await client.get("rp:dirty") == b"right"
        assert connection._writer is not writer  # reconnected, not read past the stale reply
        await client.aclose()

    asyncio.run(main())


def test_a_connection_the_server_dropped_is_reopened(redis_server):
    observer = redis_sync.Redis.from_url(redis_server.url)

    async def main() -> None:
        pool = _pool(redis_server.url)
        client = aioredis.Redis(connection_pool=pool)
        await client.client_setname("rp-dropped")
        await client.set("rp:dropped", "v")
        observer.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.05)
        assert await client.get("rp:dropped") == b"v"
        await client.aclose()

    try:
        asyncio.run(main())
    finally:
        observer.close()


def test_many_borrowers_on_few_connections_all_get_their_own_answers(redis_server):
    async def main() -> None:
        pool = _pool(redis_server.url, max_connections=3)
        client = aioredis.Redis(connection_pool=pool)

        async def one(n: int) -> None:
            for i in range(20):
                assert await client.echo(f"{n}:{i}") == f"{n}:{i}".encode()

        await asyncio.gather(*(one(n) for n in range(40)))
        assert not pool._in_use_connections
        assert len(pool._available_connections) <= 3
        await client.aclose()

    asyncio.run(main())
