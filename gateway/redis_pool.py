"""The gateway's Redis connection pool: redis-py's blocking pool, with a short way in and out when nobody waits.

Every command the gateway sends borrows a connection and gives it back.
redis-py's ``BlockingConnectionPool`` does that through its condition (an
``asyncio.Condition``: a lock taken and released twice), an
``asyncio.timeout`` around the wait, a generator-based context manager for
its maintenance lock, the base pool's ``asyncio.Lock`` on the way back, an
event dispatch (with another lock) for re-authentication, and six calls to
its metrics recorder, which does nothing unless redis-py's OpenTelemetry
export is set up (the gateway does not). Profiled under ``bench/overhead.py``
that was 6 % of the gateway's CPU, more than any of our own functions.

:class:`LeanBlockingConnectionPool` takes a free connection directly when
one is free and no task is waiting for one, and puts it back directly when
no task waits. Everything else — no connection free (it waits, with its
timeout), a task already waiting (it keeps its turn), maintenance mode, a
connection to re-authenticate or to reconnect, a call with the deprecated
arguments — goes through redis-py's own code unchanged. The connection is
checked as redis-py checks it (connected, nothing unread on it); anything
unusual goes through redis-py's ``ensure_connection``. What the short way
leaves out is only the metrics recorder's calls and the locks that guard
against a waiter, of which there is none.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["LeanBlockingConnectionPool"]


class LeanBlockingConnectionPool(BlockingConnectionPool):
    """A ``BlockingConnectionPool`` that lends and takes back a free connection without its locks when no one waits."""

    def _quiet(self) -> bool:
        """No task waits for a connection and nothing holds the pool's locks: a direct hand-out is the same as
        redis-py's. An asyncio without the condition's private waiter list counts as busy (redis-py's path)."""
        condition = self._condition
        return (not self._in_maintenance and not condition.locked() and not getattr(condition, "_waiters", True)
                and not self._lock.locked())

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        if command_name is not None or keys or options:  # the deprecated form: redis-py's, with its warning
            return await super().get_connection(command_name, *keys, **options)
        if not self._available_connections or not self._quiet():
            return await super().get_connection()
        connection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        try:
            try:
                ready = connection.is_connected and not await connection.can_read()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                ready = False
            if not ready:  # closed, or something unread on it: redis-py reconnects (or raises) as it always does
                await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (connection not in self._in_use_connections or connection.should_reconnect()
                or getattr(connection, "_re_auth_token", True) is not None or not self._quiet()):
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
