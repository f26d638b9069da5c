"""Appending to the audit store, and finding a request's terminal entry, on the database driver alone.

A model worker writes terminal entries and asks whether a request already
ended; that is all it does with the store. Through :class:`audit.AuditStore`
it would hold SQLAlchemy, its ORM, SQLModel and pydantic for its whole life
(about 28 MB beside a model of a few MB, issue 9's worker budget is 70). This
store runs the very statements :class:`audit.AuditStore` runs, compiled from
the SQLModel table where SQLAlchemy is loaded and handed over as a
:class:`audit.driver_plan.DriverPlan`, on a ``sqlite3`` or ``psycopg``
connection it opens with the engine's own connect arguments and set up as
:func:`audit.db.make_engine` sets up its connections
(:func:`audit.sqlite_setup.configure_sqlite_connection`; PostgreSQL's READ
COMMITTED and :func:`audit.postgresql_setup.configure_postgresql_connection`).
The append itself is the store's (:class:`audit.appender.Appender`:
the same lock, chaining, group commit and savepoints); arguments are checked
and serialised by the store's own functions (:mod:`audit.entry_args`), and
errors are the store's (:class:`AuditError`, :class:`DuplicateTerminalError`,
:class:`InvalidEntryError`, :class:`CorruptEntryError`).

The connection is kept as the store's writer keeps its own
(:mod:`audit.kept_connection`: one transaction at a time, a connection lost
before its transaction's first statement replaced once, a forked child
forgetting its parent's).

Nothing here imports SQLAlchemy (``tests/test_import_rules.py`` holds it to that).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

from .appender import Appender
from .chain import FORMAT_1, FORMAT_2
from .driver_plan import DriverPlan
from .entry import AuditEntry
from .entry_args import prepared_entry
from .errors import AuditError, CorruptEntryError, DuplicateTerminalError
from .kept_connection import KeptConnection
from .postgresql_setup import configure_postgresql_connection
from .sqlite_setup import configure_sqlite_connection

def _driver(dialect: str) -> Any:
    """The DBAPI module for ``dialect``; imported only when used (a SQLite worker never loads psycopg)."""
    if dialect == "sqlite":
        import sqlite3

        return sqlite3
    if dialect == "postgresql":
        import psycopg

        return psycopg
    raise AuditError(f"audit store supports SQLite and PostgreSQL, not {dialect}")


class DriverConnection(KeptConnection):
    """A connection opened from a plan, kept for the appends and the reads between them
    (:mod:`audit.kept_connection` says how). Driver errors leave as the driver's own exceptions."""

    def __init__(self, plan: DriverPlan) -> None:
        self._plan = plan
        self._driver = _driver(plan.dialect)
        super().__init__(self._driver.Error, plan.busy_timeout_s, plan.dialect)

    @property
    def driver(self) -> Any:
        return self._driver

    def _connect(self) -> Any:
        plan = self._plan
        conn = self._driver.connect(*plan.connect_args, **plan.connect_kwargs)
        self._opened(conn)  # watched from here: the set-up below talks to the server
        try:
            if plan.dialect == "sqlite":
                configure_sqlite_connection(conn, plan.busy_timeout_s)
            else:  # see audit.db._postgresql_engine: the head is read after the lock is granted
                conn.isolation_level = self._driver.IsolationLevel.READ_COMMITTED
                configure_postgresql_connection(conn)
        except BaseException:
            self._drop()
            raise
        self._cursor = conn.cursor()
        return self._cursor

    def _is_lost(self, exc: Exception) -> bool:
        """psycopg marks a connection whose session ended (a restart, ``pg_terminate_backend``); SQLite's never is."""
        conn = self._conn
        return self._plan.dialect == "postgresql" and bool(conn.closed or conn.broken)


class DriverStore:
    """:meth:`append` and :meth:`terminal_for` of :class:`audit.AuditStore`, on the driver alone.

    Same arguments, same entries (byte for byte: the same statements and
    serialisation), same errors. Thread- and process-safe; one per process.
    """

    def __init__(self, plan: DriverPlan) -> None:
        self._plan = plan
        self._connection = DriverConnection(plan)
        self._appender = Appender(plan.append, lambda: self._connection)
        self._boundary: int | None = None
        self._positional = plan.append.positional

    def append(
        self,
        kind: str,
        request_id: str,
        *,
        principal: str | None,
        team: str | None,
        model: str | None,
        body: Mapping[str, Any],
        policy_revision: str | None,
        payload: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one entry at the head of the chain; see :meth:`audit.AuditStore.append`."""
        entry = prepared_entry(kind, request_id, principal=principal, team=team, model=model, body=body,
                               policy_revision=policy_revision, payload=payload)
        driver = self._connection.driver
        try:
            chained = self._appender.append(entry.fields, entry.body_text, entry.payload_text, entry.digest)
        except driver.IntegrityError as exc:
            if entry.terminal_request_id is not None:
                existing = self.terminal_for(request_id)
                if existing is not None:
                    raise DuplicateTerminalError(request_id, existing.kind) from exc
            raise AuditError(f"audit append refused by {self._plan.described}: {exc}") from exc
        except (driver.Error, OSError) as exc:
            raise AuditError(f"audit append failed on {self._plan.described}: {exc}") from exc
        return entry.entry(chained)

    def terminal_for(self, request_id: str) -> AuditEntry | None:
        """The request's terminal entry, if any; see :meth:`audit.AuditStore.terminal_for`."""
        rows = self._read(self._plan.terminal_sql, (request_id,) if self._positional else {"key": request_id})
        if not rows:
            return None
        return self._entry(rows[0])

    def boundary_seq(self) -> int | None:
        """The ``chain_format`` entry's seq (remembered once seen: it never moves)."""
        if self._boundary is None:
            rows = self._read(self._plan.boundary_sql, None)
            self._boundary = int(rows[0][0]) if rows else None
        return self._boundary

    def close(self) -> None:
        """Close the connection (a pool process exiting; an engine's ``dispose()``)."""
        self._connection.close()

    def _read(self, sql: str, params: Any) -> list[Any]:
        """A read on the store's connection, between appends, in a transaction of its own."""
        driver = self._connection.driver

        def fetch(cursor: Any) -> list[Any]:
            if params is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, params)
            try:
                return cursor.fetchall()
            except driver.DataError as exc:  # PostgreSQL: a value the driver cannot load ('infinity')
                raise CorruptEntryError(None, str(exc)) from exc

        begin = ("BEGIN",) if self._plan.dialect == "sqlite" else ()
        try:
            return self._connection.run(begin, fetch)
        except (driver.Error, OSError) as exc:
            raise AuditError(f"audit read failed on {self._plan.described}: {exc}") from exc

    def _entry(self, row: Any) -> AuditEntry:
        fields = dict(zip(self._plan.columns, row))
        try:
            fields["created_at"] = _utc(fields["created_at"])
            for name in ("body", "payload"):
                if isinstance(fields[name], (str, bytes)):
                    fields[name] = json.loads(fields[name])
        except (ValueError, TypeError) as exc:  # a tampered row (the store's readers say the same)
            raise CorruptEntryError(fields.get("seq"), str(exc)) from exc
        boundary = self.boundary_seq()
        entry_format = FORMAT_2 if boundary is not None and fields["seq"] > boundary else FORMAT_1
        return AuditEntry(**fields, format=entry_format)


def _utc(value: Any) -> datetime:
    """A stored ``created_at`` as an aware UTC datetime (SQLite keeps naive UTC text, PostgreSQL a timestamptz)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"created_at is {type(value).__name__}, not a time")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
