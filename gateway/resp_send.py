"""Writing a command to Redis in the step that sends it, not one event-loop turn later.

redis-py's asyncio connection, when it has a ``socket_timeout`` (the
gateway's has: a Redis that stops reading must not hold a request for
ever), wraps every write in ``asyncio.wait_for``. On Python 3.11
``wait_for`` runs its coroutine as a new task, so the bytes leave only when
the loop gets round to that task: after every callback already ready. On
a busy gateway that is one whole turn of the loop per command. Measured
(a probe stamping the time, then a script returning Redis's ``TIME``): a
median of 0.13 ms from the stamp to Redis on an idle loop, 10.6 ms (p95
32 ms) with ten tasks each computing 1 ms at a time; and a task costs CPU
to create. It is where a trickling team's job waited while a burst was
being admitted (``bench/fairness.py``): its ``enqueued_at`` stamped, its
push not yet sent.

:class:`ImmediateSendMixin` writes the bytes at once (an asyncio transport
sends what the socket takes straight away and buffers the rest) and waits
only when something is left to wait for: a write buffer that did not
empty, a transport that is closing. Then it goes through redis-py's own
path (``wait_for`` on the drain, the same errors and disconnects), and so
does everything it does not handle (a connection to open, a health check
due). Python 3.12's ``wait_for`` no longer starts a task; there this
saves the wrapper's cost only.
"""

from __future__ import annotations

from typing import Any, Iterable

from redis.asyncio.connection import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.resp_pack import mixed_in

_NOTHING: list[bytes] = []


class ImmediateSendMixin:
    """``send_packed_command`` that writes in the caller's step; waits (redis-py's way) only when it must."""

    async def send_packed_command(self, command: str | bytes | Iterable[bytes], check_health: bool = True) -> None:
        writer = getattr(self, "_writer", None)
        try:
            await self._send_now(command, check_health, writer)
        except RuntimeError as exc:
            # uvloop refuses a write on a closed transport with RuntimeError ("the handler is closed"), where
            # asyncio's drops it and the drain raises ConnectionResetError: the same lost connection, so the
            # error redis-py gives for that, which every caller handles (a 503, fail closed), not a 500.
            if writer is None or not writer.transport.is_closing():
                raise
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisConnectionError(f"Error writing to Redis: the connection is closed ({exc})") from exc

    async def _send_now(self, command: str | bytes | Iterable[bytes], check_health: bool, writer: Any) -> None:
        sender = super().send_packed_command  # type: ignore[misc]
        if (writer is None or not self.is_connected  # type: ignore[attr-defined]
                or (check_health and self.health_check_interval)  # type: ignore[attr-defined]
                or writer.transport.is_closing()):
            return await sender(command, check_health)
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer.writelines(command)
        except BaseException:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            # Bytes wait in the buffer, or the connection broke: redis-py's drain, with its timeout and errors.
            await sender(_NOTHING, False)


def immediate_send(cls: type[Any]) -> type[Any]:
    """``cls`` with :class:`ImmediateSendMixin` in front (one subclass per class; unchanged if it has it)."""
    return mixed_in(ImmediateSendMixin, cls)


def immediate_sending(pool: ConnectionPool) -> ConnectionPool:
    """Make the connections ``pool`` opens from now on write at once (:class:`ImmediateSendMixin`); returns ``pool``."""
    pool.connection_class = immediate_send(pool.connection_class)
    return pool
