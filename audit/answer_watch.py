"""The engine's pooled PostgreSQL connections, each wait for the server bounded, so a frozen server fails reads closed.

The append's kept connection is watched per transaction
(:mod:`audit.kept_connection`); everything else reads through SQLAlchemy's
pool: a key look-up on a cache miss, a request's terminal look-up, the
checkpointer, the review's searches, and the pool's own ``pool_pre_ping``
on an idle session. On a server that stops answering without closing the
connection (frozen, or a partition that drops packets) each of those
waited in libpq's ``recv`` without end, holding the request (or the
background task) with it.

So the engine's connections are a :class:`WatchedConnection`: psycopg
sends every exchange with the server (a statement, a fetch, a commit, a
rollback, the pre-ping) through ``Connection.wait``, which here tells
:mod:`audit.stall_watch` when the wait began. One that has had no answer for
the busy timeout plus :data:`audit.stall_watch.GRACE_S` (a lock wait the
server ends itself, at ``lock_timeout``, has answered by then) has its
socket shut down; psycopg then reports the connection lost, which
SQLAlchemy already handles: the pre-ping's lost session invalidates the
pool and the checkout connects anew (bounded by the connect timeout), a
read's lost session fails the read (``AuditError``, the caller's 503). The
bound is per exchange, not per checkout: a long export or verify made of
many short reads is never cut; a single statement the server takes longer
than the bound to answer is (read as a server that stopped answering).
Waits long by design run inside :func:`audit.stall_watch.patient`.

Connecting itself is bounded by the connect timeout (psycopg's own), not
here. A forked child never cuts a socket it inherited (the descriptor is
shared with the parent's session). Only psycopg 3, the driver govgate
installs, has ``wait`` to hook; the module is imported only where it is used.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import psycopg

from . import stall_watch

log = logging.getLogger(__name__)


class RoundTrips:
    """What :mod:`audit.stall_watch` reads of one pooled connection: when its running wait began."""

    def __init__(self, fileno: int, answer_s: float) -> None:
        # A duplicate, not the number: once psycopg closes its descriptor the number may be reused.
        self._sock: socket.socket | None = socket.socket(fileno=os.dup(fileno))
        self._pid = os.getpid()
        self._answer_s = answer_s
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.monotonic()

    def end(self) -> None:
        self._since = None

    def stall_due(self) -> float | None:
        since = self._since
        if since is None or self._sock is None or os.getpid() != self._pid:
            return None  # idle, closed, or inherited by a fork (the socket is the parent's session too)
        return since + self._answer_s

    def cut_if_stalled(self, due: float) -> None:
        sock = self._sock
        if sock is None or self.stall_due() != due:
            return  # it got its answer meanwhile
        log.error("the audit database gave no answer within %g s; dropping the pooled connection", self._answer_s)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        sock, self._sock, self._since = self._sock, None, None
        if sock is not None:
            sock.close()  # the duplicate only: the session ends with psycopg's own descriptor


class WatchedConnection(psycopg.Connection):  # type: ignore[type-arg]
    """A psycopg connection whose every wait for the server is watched (see the module's docstring)."""

    _round_trips: RoundTrips | None = None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        trips = self._round_trips
        if trips is None or stall_watch.is_patient():
            return super().wait(gen, *args, **kwargs)
        trips.begin()
        try:
            return super().wait(gen, *args, **kwargs)
        finally:
            trips.end()

    def close(self) -> None:
        try:
            super().close()
        finally:
            trips, self._round_trips = self._round_trips, None
            if trips is not None:
                trips.close()


def connect_watched(answer_s: float, cargs: Any, cparams: dict[str, Any]) -> WatchedConnection:
    """What SQLAlchemy's ``do_connect`` returns: the dialect's connection, watched from its first exchange."""
    conn = WatchedConnection.connect(*cargs, **cparams)
    trips = RoundTrips(conn.fileno(), answer_s)
    conn._round_trips = trips
    stall_watch.watch(trips)
    return conn
