"""The gateway's Redis connections write a command in the step that sends it (``gateway/resp_send.py``)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis as redis_sync
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.resp_pack import fast_packing
from gateway.resp_send import ImmediateSendMixin, immediate_send, immediate_sending
from tests.own_redis import doomed_redis  # noqa: F401 - fixture


def _client(url: str, **options) -> aioredis.Redis:
    """The gateway's kind of client: a timeout on the socket, fast packing, immediate sending."""
    pool = immediate_sending(fast_packing(aioredis.ConnectionPool.from_url(url, socket_timeout=10, **options)))
    return aioredis.Redis(connection_pool=pool)


def test_the_class_is_made_once_and_kept():
    pool = immediate_sending(fast_packing(aioredis.ConnectionPool.from_url("redis://127.0.0.1:1/0")))
    assert issubclass(pool.connection_class, ImmediateSendMixin)
    assert immediate_send(pool.connection_class) is pool.connection_class
    again = immediate_sending(fast_packing(aioredis.ConnectionPool.from_url("redis://127.0.0.1:1/0")))
    assert again.connection_class is pool.connection_class


def test_the_command_is_in_redis_before_the_caller_first_waits(redis_server):
    """Stepped by hand: at the coroutine's first suspension (waiting for the reply) the SET has already been
    applied, so no other task's turn came between the call and the write. (redis-py's own connection, with a
    socket timeout on Python 3.11, writes only when the loop runs the ``wait_for`` task it made.)"""
    observer = redis_sync.Redis.from_url(redis_server.url)

    async def main() -> None:
        client = _client(redis_server.url)
        await client.ping()  # connected
        observer.delete("rs:first")
        call = client.execute_command("SET", "rs:first", "written")
        call.send(None)  # runs until the first await that suspends
        try:
            assert observer.get("rs:first") == b"written"
        finally:
            call.close()
        await client.aclose()

    try:
        asyncio.run(main())
    finally:
        observer.delete("rs:first")
        observer.close()


def test_a_value_larger_than_the_socket_takes_is_drained_whole(redis_server):
    """32 MB do not fit in the socket's buffer at once: the rest waits in the transport and is drained
    redis-py's way; the value arrives intact, and a pipeline after it too."""
    value = os.urandom(32 * 1024 * 1024)

    async def main() -> None:
        client = _client(redis_server.url)
        try:
            assert await client.set("rs:big", value)
            assert await client.get("rs:big") == value
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("rs:small", "1").incr("rs:small").get("rs:small")
                assert await pipe.execute() == [True, 2, b"2"]
        finally:
            await client.delete("rs:big", "rs:small")
            await client.aclose()

    asyncio.run(main())


def test_a_redis_that_is_gone_is_an_error_not_a_hang(doomed_redis):
    """Redis killed under a connected client: the next command raises a connection error (through the same
    checks redis-py makes), and once a Redis is back the client works again."""

    async def main() -> None:
        client = _client(doomed_redis.url)
        try:
            assert await client.ping()
            os.kill(doomed_redis.process.pid, signal.SIGKILL)
            doomed_redis.process.wait(timeout=10)
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(client.set("rs:gone", "x"), timeout=20)
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_write_on_a_closed_connection_is_a_connection_error_on_either_loop(redis_server, loop):
    """The connection's transport closed under it (Redis went away, a reset): asyncio's transport drops the
    write and the drain raises; uvloop's refuses it with a RuntimeError, which once escaped as a 500 (soak,
    redis_restart). Both are the connection error the gateway's callers turn into a 503; the next command
    opens a new connection and works."""
    import uvloop

    async def main() -> None:
        client = _client(redis_server.url)
        try:
            assert await client.ping()
            # Taken from the pool (which checks a connection it hands out), then closed under its holder:
            # the moment a command is written on a connection whose Redis just went away.
            connection = await client.connection_pool.get_connection()
            connection._writer.transport.close()
            await asyncio.sleep(0.05)  # the close is done
            with pytest.raises(RedisConnectionError):
                await connection.send_packed_command(connection.pack_command("SET", "rs:closed", "x"))
            await client.connection_pool.release(connection)
            assert await client.set("rs:closed", "y")
            assert await client.get("rs:closed") == b"y"
        finally:
            await client.delete("rs:closed")
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(main())
