"""Short transactions on the engine's own DBAPI connections, for the hot paths.

An append through a SQLAlchemy ``Connection`` spends more CPU in SQLAlchemy
(events, cache keys, parameter processing, result wrapping) than SQLite
spends on the insert. The keyed look-ups (:mod:`audit.lookup`) and
verify's reads therefore run statements compiled once from the same
SQLModel table on a connection checked out of the *same* engine pool: same
database, same connect-time settings (:func:`audit.db.make_engine`), same
pool resets and disposal after fork; with ``begin`` the same write lock as
:func:`audit.db.locked_transaction`. The append goes further and keeps one
connection for itself (:mod:`audit.writer`): it runs on every request.

Driver errors are wrapped into SQLAlchemy's exception classes exactly as a
``Connection`` would wrap them, so the store's error mapping (``IntegrityError``
for a refused insert, anything in :data:`audit.db.DB_ERRORS` otherwise) stays
one piece of code for both paths.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError


@contextmanager
def dbapi_cursor(engine: Engine, *, begin: tuple[str, ...] = ()) -> Iterator[Any]:
    """A DBAPI cursor in a transaction that commits when the block exits normally.

    ``begin`` runs first: :func:`audit.db.lock_statements` makes the
    transaction hold the write lock from its first statement, as
    :func:`audit.db.locked_transaction` does (SQLite ``BEGIN IMMEDIATE``,
    PostgreSQL ``pg_advisory_xact_lock``). Without it, the block reads: SQLite connections run in autocommit (pysqlite's own ``BEGIN`` is
    switched off), PostgreSQL's implicit transaction ends at commit.
    Driver errors leave as SQLAlchemy ``DBAPIError`` subclasses; a connection
    the driver reports as lost is invalidated, not returned to the pool.
    """
    dialect = engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    conn: Any = None
    cursor: Any = None
    try:
        conn = engine.raw_connection()
        cursor = conn.cursor()
        for statement in begin:
            cursor.execute(statement)
        yield cursor
        cursor.close()
        cursor = None
        conn.commit()
    except dbapi_error as exc:
        _give_back(conn, cursor)
        lost = conn is not None and dialect.is_disconnect(exc, conn.dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(None, None, exc, dbapi_error, connection_invalidated=lost,
                                  dialect=dialect) from exc
    except BaseException:
        _give_back(conn, cursor)
        raise
    finally:
        if conn is not None:
            conn.close()  # back to the pool, which rolls back anything left open


def _give_back(conn: Any, cursor: Any) -> None:
    """Roll back after a failure; errors here would only hide the first one."""
    for step in (getattr(cursor, "close", None), getattr(conn, "rollback", None)):
        if step is None:
            continue
        try:
            step()
        except Exception:  # noqa: BLE001 - the original error is what the caller needs
            pass
