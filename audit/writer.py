"""One long-lived driver connection per engine for the appends, so an append costs its statements, not a pool checkout.

Checking a connection out of SQLAlchemy's pool and back in costs tens of
microseconds per append (events, the reset-on-return rollback, the
pre-ping round trip on PostgreSQL) on a path where SQLite itself spends
about a quarter of a millisecond. :class:`WriterConnection` keeps one DBAPI
connection with the engine's connect-time settings and PRAGMAs
(:func:`audit.db.make_engine`): on SQLite made by the engine and then
detached from its pool, on PostgreSQL opened by the driver beside the pool
(so a reconnect to a server that stopped answering waits for no pooled
session's pre-ping, only for the connect timeout), and runs
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

import threading
import weakref
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError

from .db import busy_timeout_s, connect_args_of
from .kept_connection import KeptConnection
from .postgresql_setup import configure_postgresql_connection

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


class WriterConnection(KeptConnection):
    """The engine's own DBAPI connection, kept for the appends (:mod:`audit.kept_connection` says how)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.dialect.loaded_dbapi.Error, busy_timeout_s(engine), engine.dialect.name)
        self._engine = weakref.ref(engine)  # the engine's dispose event holds us; we must not hold it
        self._dialect = engine.dialect
        event.listen(engine, "engine_disposed", self._on_dispose)

    def _connect(self) -> Any:
        engine = self._engine()
        if engine is None:
            raise RuntimeError("the audit store's engine is gone")
        if self._dialect.name == "postgresql":
            conn = self._connect_postgresql(engine)
        else:
            proxied = engine.raw_connection()  # the engine's connect events run (PRAGMAs)
            conn = proxied.dbapi_connection
            proxied.detach()  # ours for good: the pool forgets it and keeps its own capacity
            self._opened(conn)
        self._cursor = conn.cursor()
        return self._cursor

    def _connect_postgresql(self, engine: Engine) -> Any:
        """A session of its own, not one from the pool: reconnecting is then bounded by the connect timeout alone.

        A pooled session is pre-pinged at checkout; on a server that stopped
        answering (frozen, a partition) the idle sessions the pool keeps would
        each cost a ping's bound first (:mod:`audit.answer_watch`), and the
        writer reconnects exactly then. Connected with the engine's own
        arguments (the URL's, :func:`audit.db.connect_args_of`'s timeouts,
        encoding and ``lock_timeout``, SQLAlchemy's adapters) and set up as the
        engine's connect events set up its sessions (READ COMMITTED, durable
        commits: :func:`audit.db._postgresql_engine`), as the workers' driver
        store does.
        """
        dialect = self._dialect
        cargs, cparams = dialect.create_connect_args(engine.url)
        cparams.update(connect_args_of(engine))
        conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
        self._opened(conn)  # watched from here: the set-up below talks to the server
        try:
            dialect.set_isolation_level(conn, "READ COMMITTED")
            configure_postgresql_connection(conn)
        except BaseException:
            self._drop()
            raise
        return conn

    def _is_lost(self, exc: Exception) -> bool:
        return self._dialect.is_disconnect(exc, self._conn, self._cursor)

    def _wrapped(self, exc: Exception, lost: bool) -> DBAPIError:
        """As SQLAlchemy wraps a driver error, so the store's error mapping is one piece of code."""
        return DBAPIError.instance(None, None, exc, self._dbapi_error, connection_invalidated=lost,
                                   dialect=self._dialect)

    def _on_dispose(self, _engine: Engine) -> None:
        """``engine.dispose()``: close the connection as the pool's are closed (after a running append)."""
        self.close()
