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
socket shut down (unless the server says it is still running it: below); psycopg then reports the connection lost, which
SQLAlchemy already handles: the pre-ping's lost session invalidates the
pool and the checkout connects anew (bounded by the connect timeout), a
read's lost session fails the read (``AuditError``, the caller's 503). The
bound is per exchange, not per checkout: a long export or verify made of
many short reads is never cut. Waits long by design run inside
:func:`audit.stall_watch.patient`.

A slow statement is not a silent server. Until 2026-12-02 a single statement
the server took longer than the bound to answer (a review search over a
large log, an aggregate) was cut as if the server had stopped answering, so
a short busy timeout, chosen to fail appends fast behind a lock, cut the
reviewers' searches too. Now, when a wait reaches its bound, the watchdog
first asks the server on a connection of its own (:class:`_Probe`) whether
the session's backend is running a statement (``pg_stat_activity``'s
``state`` of its process, which a role may read for its own sessions). An
answer of ``active`` within :data:`PROBE_ANSWER_S` means the server is there
and working on it: the wait gets another bound, and is asked about again
at its end. No answer in time (a frozen server or a partition: a new
session cannot even be set up), an error, or a backend that is not running
a statement (a frozen backend, or an answer lost on the way) and the
socket is shut down as before: the silent server costs the bound plus
:data:`PROBE_ANSWER_S`. A statement still ``active`` after
:data:`LONGEST_RUNNING_S` is cut too: a backend hung in the middle of one
(a dead disk; stopped) is ``active`` for good, and until 2026-12-02 its
read was waited for without end.

Connecting itself is bounded by the connect timeout (psycopg's own), not
here. A forked child never cuts a socket it inherited (the descriptor is
shared with the parent's session). Only psycopg 3, the driver govgate
installs, has ``wait`` to hook; the module is imported only where it is used.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Final

import psycopg

from . import stall_watch

log = logging.getLogger(__name__)


#: How long the watchdog waits for the server's answer about a statement past its bound.
PROBE_ANSWER_S: Final = 1.0
#: The longest a statement the server says it is running is waited for (at least one bound). A backend
#: hung mid-statement (on a dead disk, or stopped) stays ``active`` in ``pg_stat_activity`` for good: without
#: this the read, and the request or task behind it, waited without end. Longer than any review search.
LONGEST_RUNNING_S = 300.0
#: The probe's own connect timeout (libpq's floor: 2 s); the watchdog stops waiting for it sooner.
_PROBE_CONNECT_TIMEOUT_S: Final = 2

#: Asks the server whether the watched session's backend is running a statement now.
StatementRunning = Callable[[], bool]


class _Probe:
    """One question to the server, asked on a thread of its own (the watchdog never blocks on it).

    ``running`` stays None until the answer comes; an error is ``False``.
    A probe the watchdog stopped waiting for ends by itself: its connect at
    the connect timeout (a silent server never lets its session start), its
    question cut by the watchdog after as long (its session is watched too,
    never asked about: a server that stopped answering just after the
    session was set up held the probe without end until 2026-12-02).
    """

    def __init__(self, ask: StatementRunning) -> None:
        self.running: bool | None = None
        self._ask = ask
        try:
            threading.Thread(target=self._run, name="govgate-audit-answer-probe", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (raised in the watchdog's thread, it killed it)
            log.warning("cannot ask the audit database about a statement past its bound: %s", exc)
            self.running = False

    def _run(self) -> None:
        try:
            answer = bool(self._ask())
        except Exception as exc:  # noqa: BLE001 - any failure reads as "no answer"
            log.debug("the audit database's probe failed: %s", exc)
            answer = False
        self.running = answer


@dataclass(frozen=True)
class _Looked:
    """What the watchdog made of the wait begun at ``since``: when it looks next, and the probe out."""

    since: float
    due: float
    probe: _Probe | None


class RoundTrips:
    """What :mod:`audit.stall_watch` reads of one pooled connection: when its running wait began."""

    def __init__(self, fileno: int, answer_s: float, statement_running: StatementRunning | None = None) -> None:
        # A duplicate, not the number: once psycopg closes its descriptor the number may be reused.
        self._sock: socket.socket | None = socket.socket(fileno=os.dup(fileno))
        self._pid = os.getpid()
        self._answer_s = answer_s
        self._since: float | None = None
        self._statement_running = statement_running
        #: Written by the watchdog only; read for the wait it names (a later wait starts afresh).
        self._looked: _Looked | None = None

    def begin(self) -> None:
        self._since = time.monotonic()

    def end(self) -> None:
        self._since = None

    def stall_due(self) -> float | None:
        since = self._since
        if since is None or self._sock is None or os.getpid() != self._pid:
            return None  # idle, closed, or inherited by a fork (the socket is the parent's session too)
        looked = self._looked
        if looked is not None and looked.since == since:
            return looked.due
        return since + self._answer_s

    def cut_if_stalled(self, due: float) -> None:
        sock = self._sock
        since = self._since
        if sock is None or since is None or self.stall_due() != due:
            return  # it got its answer meanwhile
        looked = self._looked if self._looked is not None and self._looked.since == since else None
        longest = since + max(LONGEST_RUNNING_S, self._answer_s)
        if self._statement_running is not None and time.monotonic() < longest:
            if looked is None or looked.probe is None:
                # past the bound: is the server there, running it? (asked once per bound)
                self._looked = _Looked(since, time.monotonic() + PROBE_ANSWER_S, _Probe(self._statement_running))
                return
            if looked.probe.running:
                log.info("the audit database is still running a statement after %.0f s; waiting another %g s",
                         time.monotonic() - since, self._answer_s)
                self._looked = _Looked(since, min(time.monotonic() + self._answer_s, longest), None)
                return
        if time.monotonic() >= longest:
            log.error("the audit database has not answered a statement in %.0f s, the longest one is waited for; "
                      "dropping the pooled connection", time.monotonic() - since)
        else:
            log.error("the audit database gave no answer within %g s and did not say it is still working on it; "
                      "dropping the pooled connection", self._answer_s)
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


def statement_running(cargs: Any, cparams: dict[str, Any], backend_pid: int) -> StatementRunning:
    """The probe of one session: on a new connection with the session's own arguments, whether its
    backend (``backend_pid``) is running a statement."""
    params = {**cparams, "connect_timeout": _PROBE_CONNECT_TIMEOUT_S, "autocommit": True}

    def ask() -> bool:
        # Watched itself (bounded, never asked about): a server that stops answering once the probe's
        # session is set up held the probe's thread and session without end.
        with _watched(WatchedConnection.connect(*cargs, **params), _PROBE_CONNECT_TIMEOUT_S, None) as probe:
            row = probe.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (backend_pid,)).fetchone()
        return row is not None and row[0] == "active"

    return ask


def connect_watched(answer_s: float, cargs: Any, cparams: dict[str, Any]) -> WatchedConnection:
    """What SQLAlchemy's ``do_connect`` returns: the dialect's connection, watched from its first exchange."""
    conn = WatchedConnection.connect(*cargs, **cparams)
    return _watched(conn, answer_s, statement_running(cargs, cparams, conn.info.backend_pid))


def _watched(conn: WatchedConnection, answer_s: float, running: StatementRunning | None) -> WatchedConnection:
    """``conn``, each of its waits from now on cut after ``answer_s`` unless ``running()`` says otherwise."""
    trips = RoundTrips(conn.fileno(), answer_s, running)
    conn._round_trips = trips
    stall_watch.watch(trips)
    return conn
