"""One database connection kept by a process for its appends: short write transactions, one at a time.

The store's writer (:mod:`audit.writer`, the engine's own connection) and
the workers' driver store (:mod:`audit.driver_store`, a connection it opens
from a plan) differ only in how they connect, how they tell a lost
connection and how they hand back driver errors; what keeping one
connection means is here, once:

- one transaction at a time under a lock, waited for at most the busy
  timeout (then a ``TimeoutError``, as a database that stays locked fails);
  a transaction from inside a transaction on the same thread is refused
  (on one connection its ``BEGIN`` would roll the outer one back);
- a connection lost *before* the transaction's first statement ran is
  replaced and the transaction tried once more (nothing was written: a
  PostgreSQL restart costs a reconnect, not a failed append); lost *inside*
  it, it is dropped and the transaction fails, never retried (the insert
  may have run);
- a forked child forgets its parent's connection without closing it
  (closing would end the parent's PostgreSQL session or drop its SQLite
  locks) and connects anew;
- a transaction on a socket (PostgreSQL) that gets no answer within the
  busy timeout (a frozen server, a partition) has its socket shut down by
  :mod:`audit.stall_watch`, so it ends as a connection lost inside it:
  dropped, failed closed, not retried. Connecting is bounded by the
  driver's connect timeout, and the session's set-up statements are
  watched like the transaction's (:meth:`KeptConnection._opened`).

Nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable, TypeVar

from . import stall_watch

T = TypeVar("T")
log = logging.getLogger(__name__)

#: What psycopg says when the connection's socket failed under it (its descriptor gone, the poll told
#: of an error) before libpq saw the session end: ``broken`` is still False and the driver's own test of
#: a disconnect (SQLAlchemy's ``is_disconnect``) says no, yet the session is gone all the same. Seen on
#: the first append after ``pg_terminate_backend`` (the backend's exit racing the next query).
SOCKET_CLOSED = "connection socket closed"


def socket_closed(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised while handling, is psycopg's :data:`SOCKET_CLOSED`
    (SQLAlchemy's pre-ping restores ``autocommit`` in a ``finally``, and on such a socket that raises a
    ``ProgrammingError`` over it)."""
    for _ in range(4):
        if exc is None:
            return False
        if str(exc) == SOCKET_CLOSED:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


#: A wait for this process's other appends shorter than this leaves the database's wait as it is (no
#: statement more on the usual path); past it the database's wait is what is left of the busy timeout.
SHORTENED_AFTER_S = 0.05


def shortened_wait(dialect: str, left_s: float, full_s: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The statements that give one transaction ``left_s`` to get the database's lock (at least 1 ms), and
    those that give the connection back its ``full_s`` after it: SQLite's ``busy_timeout`` is the
    connection's; PostgreSQL's ``SET LOCAL lock_timeout`` ends with the transaction it opens."""
    left_ms = max(1, round(left_s * 1000))
    if dialect == "postgresql":
        return (f"SET LOCAL lock_timeout = '{left_ms}ms'",), ()
    return (f"PRAGMA busy_timeout = {left_ms}",), (f"PRAGMA busy_timeout = {max(1, round(full_s * 1000))}",)


#: Every kept connection of this process, so a fork can make the child forget theirs.
_KEPT: "weakref.WeakSet[KeptConnection]" = weakref.WeakSet()


class KeptConnection:
    """A connection :meth:`run` runs short transactions on; subclasses say how to connect."""

    def __init__(self, driver_error: type[Exception], wait_s: float, dialect: str) -> None:
        self._dialect_name = dialect
        self._dbapi_error = driver_error
        self._wait_s = wait_s  # as long as SQLite waits for another process's lock
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside run(), to refuse a transaction from within one
        self._conn: Any = None
        self._cursor: Any = None
        #: A duplicate of the connection's socket, for the watchdog to shut down (None: no socket, SQLite).
        self._sock: socket.socket | None = None
        #: When the running transaction started (monotonic), None between transactions.
        self._since: float | None = None
        self._answer_s = wait_s + stall_watch.GRACE_S
        _KEPT.add(self)

    # -- what subclasses say ---------------------------------------------------------------

    def _connect(self) -> Any:
        """Open the connection, hand it to :meth:`_opened` before setting it up, set ``self._cursor``, return it.

        A set-up that fails closes it with :meth:`_drop` before raising.
        """
        raise NotImplementedError

    def _opened(self, conn: Any) -> None:
        """The driver connected (within its connect timeout): keep ``conn`` and watch it from its first statement.

        The transaction's bound starts again here: the connect had its own,
        and counting it would cut a connection that just answered.
        """
        self._conn = conn
        self._since = time.monotonic()
        self._watch_socket()

    def _is_lost(self, exc: Exception) -> bool:
        """Whether ``exc`` says the connection itself is gone (not only the statement refused)."""
        return False

    def _gone(self, exc: Exception) -> bool:
        """:meth:`_is_lost`, or the driver's word for a socket that failed before it noticed (:data:`SOCKET_CLOSED`)."""
        return self._conn is not None and (self._is_lost(exc) or socket_closed(exc))

    def _wrapped(self, exc: Exception, lost: bool) -> Exception:
        """What a driver error leaves :meth:`run` as (unchanged here)."""
        return exc

    # -- the transaction -------------------------------------------------------------------

    def run(self, begin: tuple[str, ...], work: Callable[[Any], T], since: float | None = None) -> T:
        """Run ``begin``'s statements, then ``work(cursor)``, then commit; roll back if anything raises.

        The busy timeout bounds the whole wait, from ``since`` (monotonic: when the caller's own wait
        began, the group commit's queue) or from the call: for this process's other appends, then for the
        database's lock, what is left of it.

        ``begin`` takes the write lock (:func:`audit.db.lock_statements`).
        Driver errors leave as :meth:`_wrapped` makes them; anything else
        ``work`` raises leaves unchanged, after the rollback.
        """
        me = threading.get_ident()
        if self._owner == me:
            # On the same connection the inner BEGIN would fail and roll the outer transaction back.
            raise RuntimeError("an audit append cannot run inside another append's transaction (alongside)")
        arrived = time.monotonic() if since is None else since
        if not self._lock.acquire(timeout=max(0.0, self._wait_s - (time.monotonic() - arrived))):
            # Other threads of this process hold the connection (each waiting on the database's lock):
            # fail closed as a database that stays locked does (TimeoutError is an OSError).
            raise TimeoutError(f"waited {self._wait_s:g} s for this process's other audit appends")
        self._owner = me
        self._since = time.monotonic()
        waited = self._since - arrived
        restore: tuple[str, ...] = ()
        if waited > SHORTENED_AFTER_S:
            # The busy timeout bounds an append's whole wait, its process's other appends included: one that
            # waited 28 s behind another then waited the database's whole 30 s again (42-47 s, probe s55 F3).
            shorter, restore = shortened_wait(self._dialect_name, self._wait_s - waited, self._wait_s)
            begin = (*shorter, *begin)
        try:
            cursor = self._begin(begin)
            try:
                result = work(cursor)
                self._conn.commit()
            except self._dbapi_error as exc:
                raise self._failed(exc) from exc
            except BaseException:
                self._roll_back()
                raise
            return result
        finally:
            if restore and self._conn is not None:
                self._restore(restore)
            self._since = None
            self._owner = None
            self._lock.release()

    def _restore(self, statements: tuple[str, ...]) -> None:
        """The connection's own busy timeout again, after a transaction given less (a lost connection is
        made anew with it: nothing to restore then)."""
        try:
            for statement in statements:
                self._cursor.execute(statement)
        except self._dbapi_error:
            self._drop()  # a connection in a state unknown: the next append connects afresh, set up as ever

    def answered(self) -> None:
        """The server answered the running transaction's latest statement: its bound starts again.

        The bound is for a server that stops answering, not for a long
        transaction it answers statement by statement: a batch of many
        entries (the gateway's audit thread hands the store up to 256 at
        once, a round trip each, three each again when one of them is
        refused) over a link of a few milliseconds outlasts the busy
        timeout plus its grace, and until 2026-12-02 it was
        cut, every append in it failed, and the next batch (the backlog, as
        large) the same way. The lock wait, which the server ends itself at
        ``lock_timeout``, is still bounded from the transaction's start.
        """
        if self._since is not None:
            self._since = time.monotonic()

    def wrap(self, exc: Exception) -> Exception:
        """A driver error raised inside :meth:`run`'s work, as :meth:`run` would hand it back (others unchanged)."""
        if isinstance(exc, self._dbapi_error):
            return self._wrapped(exc, False)
        return exc

    def lost(self, exc: Exception) -> bool:
        """Whether an error raised inside :meth:`run`'s work came with the connection lost (the server gone,
        the session ended, a socket the stall watch shut down), not only the statement refused.

        The appender writes a batch without savepoints and, when one entry
        is refused, writes the others again in a new transaction
        (:meth:`audit.appender.Appender._write`); a lost connection is not
        such a refusal: a new transaction would reconnect and wait for the
        server again, so it fails every entry, never retried.
        """
        return isinstance(exc, self._dbapi_error) and self._gone(exc)

    def _begin(self, begin: tuple[str, ...]) -> Any:
        """A cursor in a transaction that holds the write lock; reconnects once if the kept connection was lost."""
        reused = self._conn is not None
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    cursor = self._connect()
                else:
                    cursor = self._cursor
                for statement in begin:
                    cursor.execute(statement)
                return cursor
            except self._dbapi_error as exc:
                lost = self._gone(exc)
                if not (lost and reused and attempt == 1):
                    raise self._failed(exc) from exc
                self._drop()  # nothing was written: try once more on a new connection (its bound: _opened)
        raise AssertionError("unreachable")  # pragma: no cover

    def _watch_socket(self) -> None:
        """Keep a duplicate of the new connection's socket and have the watchdog watch us (no socket: nothing)."""
        fileno = getattr(self._conn, "fileno", None)
        if fileno is None:
            return
        # A duplicate, not the number: once the driver closes its descriptor the number may be reused by
        # another file, while shutting the duplicate down only ever reaches this connection's socket.
        self._sock = socket.socket(fileno=os.dup(fileno()))
        stall_watch.watch(self)

    def stall_due(self) -> float | None:
        """When the running transaction has waited too long for an answer (for :mod:`audit.stall_watch`)."""
        since = self._since
        if since is None or self._sock is None:
            return None
        return since + self._answer_s

    def cut_if_stalled(self, due: float) -> None:
        """Shut the socket down under the transaction that was due at ``due``, if it still runs."""
        sock = self._sock
        if sock is None or self.stall_due() != due:
            return  # it ended meanwhile (a race that costs at most a reconnect: the next one sees a lost connection)
        log.error("the audit database gave no answer within %g s; dropping the connection", self._answer_s)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def _failed(self, exc: Exception) -> Exception:
        """Roll back (or drop the connection if it is lost) and hand ``exc`` back as :meth:`_wrapped` makes it."""
        lost = self._gone(exc)
        if lost:
            self._drop()
        else:
            self._roll_back()
        return self._wrapped(exc, lost)

    def _roll_back(self) -> None:
        """Roll back; a connection that cannot even do that is dropped (errors here would hide the first one)."""
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except Exception:  # noqa: BLE001 - the original error is what the caller needs
            self._drop()

    def _drop(self) -> None:
        """Close the connection and forget it; the next transaction connects anew."""
        conn, self._conn, self._cursor = self._conn, None, None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # the duplicate only: closing it does not end the session
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def close(self) -> None:
        """Close the connection (after a running transaction); the next one connects anew."""
        if self._owner == threading.get_ident():
            return  # from inside a transaction (an alongside): closing would pull the connection from under it
        with self._lock:
            self._drop()

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's connection is not ours to use or to close."""
        self._lock = threading.Lock()  # it may have been held by a thread that does not exist here
        self._owner = None
        self._since = None
        self._conn = self._cursor = None
        if self._sock is not None:
            self._sock.close()  # our descriptor only (a close, never a shutdown: that would cut the parent's)
            self._sock = None


def _forget_all_after_fork() -> None:
    for kept in list(_KEPT):
        kept._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)
