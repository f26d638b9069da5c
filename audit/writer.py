"""One long-lived driver connection per engine for the appends, so an append costs its statements, not a pool checkout.

Checking a connection out of SQLAlchemy's pool and back in costs tens of
microseconds per append (events, the reset-on-return rollback, the
pre-ping round trip on PostgreSQL) on a path where SQLite itself spends
about a quarter of a millisecond. :class:`WriterConnection` keeps one DBAPI
connection, made by the engine (same connect-time settings and PRAGMAs,
:func:`audit.db.make_engine`) and then detached from its pool, and runs
every append of the process on it, one at a time (a lock): appends
serialise on the database's write lock anyway. A thread waits for the
lock at most the engine's busy timeout (:func:`audit.db.busy_timeout_s`), as it would wait for SQLite's
lock, then fails closed; an append from inside an append's ``alongside``
is refused (on one connection it would roll the outer one back).

What the pool did for us is done here:

- a connection the driver reports as lost (a PostgreSQL restart, an
  administrator's ``pg_terminate_backend``) is dropped; if it was lost
  before the transaction's first statement ran, nothing was written and
  the transaction is tried once more on a fresh connection, so a restart
  costs one reconnect, not a failed append (what ``pool_pre_ping`` did);
- after a fork the child never touches the parent's connection (it would
  share its socket or SQLite's file locks): it is forgotten, not closed,
  and the child connects anew;
- ``engine.dispose()`` closes it, as it closes the pool's connections.

Driver errors leave as SQLAlchemy ``DBAPIError`` subclasses, wrapped the way
:mod:`audit.dbapi` wraps them, so the store's error mapping is unchanged.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError

from .db import busy_timeout_s

T = TypeVar("T")

#: Every writer of this process, so a fork can make the child forget their connections.
_WRITERS: "weakref.WeakSet[WriterConnection]" = weakref.WeakSet()
#: One writer per engine (a second store on the same engine shares it).
_BY_ENGINE: "weakref.WeakKeyDictionary[Engine, WriterConnection]" = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def writer_for(engine: Engine) -> WriterConnection:
    """The writer connection of ``engine`` in this process, made on first use."""
    writer = _BY_ENGINE.get(engine)
    if writer is None:
        with _REGISTRY_LOCK:
            writer = _BY_ENGINE.get(engine)
            if writer is None:
                writer = _BY_ENGINE[engine] = WriterConnection(engine)
    return writer


class WriterConnection:
    """A dedicated DBAPI connection on which :meth:`run` runs short write transactions, one at a time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)  # the engine's dispose event holds us; we must not hold it
        self._dialect = engine.dialect
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._wait_s = busy_timeout_s(engine)  # as long as SQLite waits for another process's lock
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside run(), to refuse an append from within an append
        self._conn: Any = None
        self._cursor: Any = None
        _WRITERS.add(self)
        event.listen(engine, "engine_disposed", self._on_dispose)

    def run(self, begin: tuple[str, ...], work: Callable[[Any], T]) -> T:
        """Run ``begin``'s statements, then ``work(cursor)``, then commit; roll back if anything raises.

        ``begin`` takes the write lock (:func:`audit.db.lock_statements`).
        Driver errors leave as SQLAlchemy ``DBAPIError`` subclasses; anything
        else ``work`` raises leaves unchanged, after the rollback.
        """
        me = threading.get_ident()
        if self._owner == me:
            # On the same connection the inner BEGIN would fail and roll the outer transaction back.
            raise RuntimeError("an audit append cannot run inside another append's transaction (alongside)")
        if not self._lock.acquire(timeout=self._wait_s):
            # Other threads of this process hold the writer (each waiting on the database's lock):
            # fail closed as a database that stays locked does (TimeoutError is an OSError).
            raise TimeoutError(f"waited {self._wait_s:g} s for this process's other audit appends")
        self._owner = me
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
            self._owner = None
            self._lock.release()

    def _begin(self, begin: tuple[str, ...]) -> Any:
        """A cursor in a transaction that holds the write lock; reconnects once if the kept connection was lost."""
        reused = self._conn is not None
        for attempt in (1, 2):
            try:
                cursor = self._cursor if self._conn is not None else self._connect()
                for statement in begin:
                    cursor.execute(statement)
                return cursor
            except self._dbapi_error as exc:
                lost = self._is_disconnect(exc)
                if not (lost and reused and attempt == 1):
                    raise self._failed(exc) from exc
                self._drop()  # nothing was written: try once more on a new connection
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> Any:
        engine = self._engine()
        if engine is None:
            raise RuntimeError("the audit store's engine is gone")
        proxied = engine.raw_connection()  # the engine's connect events run (PRAGMAs, encoding)
        conn = proxied.dbapi_connection
        proxied.detach()  # ours for good: the pool forgets it and keeps its own capacity
        self._conn, self._cursor = conn, conn.cursor()
        return self._cursor

    def _failed(self, exc: Exception) -> DBAPIError:
        """Roll back (or drop the connection if it is lost) and wrap ``exc`` as SQLAlchemy would."""
        lost = self._is_disconnect(exc)
        if lost:
            self._drop()
        else:
            self._roll_back()
        return DBAPIError.instance(None, None, exc, self._dbapi_error, connection_invalidated=lost,
                                   dialect=self._dialect)

    def wrap(self, exc: Exception) -> Exception:
        """A driver error raised inside :meth:`run`'s work, wrapped as SQLAlchemy would (others unchanged)."""
        if isinstance(exc, self._dbapi_error):
            return DBAPIError.instance(None, None, exc, self._dbapi_error, connection_invalidated=False,
                                       dialect=self._dialect)
        return exc

    def _is_disconnect(self, exc: Exception) -> bool:
        return self._conn is not None and self._dialect.is_disconnect(exc, self._conn, self._cursor)

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
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def _on_dispose(self, _engine: Engine) -> None:
        """``engine.dispose()``: close the connection as the pool's are closed (after a running append)."""
        if self._owner == threading.get_ident():
            return  # from inside an append (its alongside): closing would pull the connection from under it
        with self._lock:
            self._drop()

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's connection is not ours to use or to close."""
        self._lock = threading.Lock()  # it may have been held by a thread that does not exist here
        self._owner = None
        self._conn = self._cursor = None


def _forget_all_after_fork() -> None:
    for writer in list(_WRITERS):
        writer._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)
