"""Redis commands sent at once whose replies are read later, on one pooled connection.

Why: between the BRPOP that takes a job and the moment the job reaches the
pool process, the worker's main process used to wait for two replies it did
not need yet: the fair-share pick (its charge is what matters, and Redis
applies it as soon as the command arrives; its order is needed only for the
next BRPOP) and the unacknowledged bookkeeping (needed only if the job must
be restored). Each wait is a round trip through Redis while the pool process
idles, and on a loaded two-core machine a round trip is a scheduling
decision, not microseconds. Sending them and reading the replies when they
are next needed takes both off the path from queue to model; the ack's
removal of the bookkeeping went the same way; it now rides on the take the
ack sends, and goes here only when no take carries it
(``workers/contract/kombu_redis.py``).

Order is what the bookkeeping rests on, so the rules are: every command goes
out on this one connection in the order it was sent, and whoever next uses
Redis in a way that depends on those commands (an ack, a reject, a restore,
a synchronous pick, the next BRPOP while a pick's order is unread) calls
:meth:`DeferredReplies.settle` first, which reads every outstanding reply. A reply arrives whether or not
it is read; reading it later costs nothing but the parse.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

#: What to do with one reply: called with the reply, or with the ``RedisError`` that stood for it.
ReplyHandler = Callable[[Any], None]


def ignore_reply(reply: Any) -> None:
    """For commands whose reply says nothing new (HSET, ZADD): only an error is worth a line in the log."""
    if isinstance(reply, RedisError):
        log.warning("a deferred Redis command failed: %s", reply)


class DeferredReplies:
    """Commands sent on one connection of ``pool``, their replies read by :meth:`settle`.

    Not thread-safe, as kombu's channel is not: one event loop owns it.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._connection: Any = None
        self._handlers: list[ReplyHandler] = []

    @property
    def outstanding(self) -> int:
        """How many replies have not been read yet."""
        return len(self._handlers)

    def send(self, pool: Any, commands: Sequence[Sequence[Any]], handlers: Sequence[ReplyHandler]) -> None:
        """Send ``commands`` (one handler each) on this object's connection from ``pool``.

        Raises ``RedisError`` when they cannot be written (nothing is then outstanding for them). A new
        pool (kombu reconnected) first settles what went out on the old one.
        """
        if len(commands) != len(handlers):
            raise ValueError("one handler per command")
        if self._connection is not None and self._pool is not pool:
            self.settle()
        if self._connection is None:
            self._pool, self._connection = pool, pool.get_connection()
        connection = self._connection
        try:
            connection.send_packed_command(connection.pack_commands(commands))
        except BaseException:
            # What went out before on this connection cannot be read any more: its handlers hear that now,
            # so that no later reply (on a new connection) is taken for theirs.
            self._drop_connection()
            self.settle()
            raise
        self._handlers.extend(handlers)

    def settle(self) -> None:
        """Read every outstanding reply and hand each to its handler (an error reply as the error).

        Never raises for Redis: a lost connection hands every unread reply's handler the error. Then
        the connection goes back to its pool.
        """
        # Taken off the object first: a handler may send again (a new connection then) or settle.
        handlers, self._handlers = self._handlers, []
        connection, pool = self._connection, self._pool
        self._connection = self._pool = None
        failure: RedisError | None = None if connection is not None else RedisConnectionError(
            "the connection of deferred commands was lost")
        for handler in handlers:
            if failure is None:
                try:
                    reply = connection.read_response()
                except (RedisConnectionError, RedisTimeoutError, OSError) as error:
                    failure = error if isinstance(error, RedisError) else RedisConnectionError(str(error))
                    connection.disconnect()
                    reply = failure
                except RedisError as error:  # an error reply: the connection is fine
                    reply = error
            else:
                reply = failure
            try:
                handler(reply)
            except Exception:  # a handler's bug must not leave the other replies unread
                log.exception("a deferred reply's handler failed")
        if connection is not None:
            pool.release(connection)

    def _drop_connection(self) -> None:
        connection, pool = self._connection, self._pool
        self._pool = self._connection = None
        if connection is not None:
            try:
                connection.disconnect()
            finally:
                pool.release(connection)
