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
COMMITTED). The append itself is the store's (:class:`audit.appender.Appender`:
the same lock, chaining, group commit and savepoints); arguments are checked
and serialised by the store's own functions (:mod:`audit.entry_args`), and
errors are the store's (:class:`AuditError`, :class:`DuplicateTerminalError`,
:class:`InvalidEntryError`, :class:`CorruptEntryError`).

What the SQLAlchemy pool did for the store's writer is done here as in
:mod:`audit.writer`: one connection, one transaction at a time (a lock held
at most the busy timeout), a connection lost before its transaction's first
statement is replaced once, and a forked child forgets its parent's.

Nothing here imports SQLAlchemy (``tests/test_import_rules.py`` holds it to that).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TypeVar

from .appender import Appender
from .chain import FORMAT_1, FORMAT_2
from .driver_plan import DriverPlan
from .entry import AuditEntry
from .entry_args import check_args, normalise_body, normalise_payload
from .errors import AuditError, CorruptEntryError, DuplicateTerminalError, InvalidEntryError
from .kinds import CHAIN_FORMAT, TERMINAL_KINDS

T = TypeVar("T")

#: Every driver connection of this process, so a fork can make the child forget theirs.
_CONNECTIONS: "weakref.WeakSet[DriverConnection]" = weakref.WeakSet()


def _driver(dialect: str) -> Any:
    """The DBAPI module for ``dialect``; imported only when used (a SQLite worker never loads psycopg)."""
    if dialect == "sqlite":
        import sqlite3

        return sqlite3
    if dialect == "postgresql":
        import psycopg

        return psycopg
    raise AuditError(f"audit store supports SQLite and PostgreSQL, not {dialect}")


class DriverConnection:
    """One driver connection on which :meth:`run` runs short write transactions, one at a time.

    The :class:`audit.appender.Writer` an :class:`Appender` writes on, and the
    connection the store's reads use between appends (under the same lock).
    Driver errors leave as the driver's own exceptions.
    """

    def __init__(self, plan: DriverPlan) -> None:
        self._plan = plan
        self._driver = _driver(plan.dialect)
        self._error: type[Exception] = self._driver.Error
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._conn: Any = None
        self._cursor: Any = None
        _CONNECTIONS.add(self)

    @property
    def driver(self) -> Any:
        return self._driver

    def run(self, begin: tuple[str, ...], work: Callable[[Any], T]) -> T:
        """Run ``begin``'s statements, then ``work(cursor)``, then commit; roll back if anything raises."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("an audit append cannot run inside another append's transaction (alongside)")
        if not self._lock.acquire(timeout=self._plan.busy_timeout_s):
            raise TimeoutError(f"waited {self._plan.busy_timeout_s:g} s for this process's other audit appends")
        self._owner = me
        try:
            cursor = self._begin(begin)
            try:
                result = work(cursor)
                self._conn.commit()
            except self._error:
                self._after_failure()
                raise
            except BaseException:
                self._roll_back()
                raise
            return result
        finally:
            self._owner = None
            self._lock.release()

    def wrap(self, exc: Exception) -> Exception:
        """Driver errors stay the driver's here (the store maps them)."""
        return exc

    def _begin(self, begin: tuple[str, ...]) -> Any:
        """A cursor with ``begin`` run; reconnects once if the kept connection was lost (nothing was written)."""
        reused = self._conn is not None
        for attempt in (1, 2):
            try:
                cursor = self._cursor if self._conn is not None else self._connect()
                for statement in begin:
                    cursor.execute(statement)
                return cursor
            except self._error:
                lost = self._is_lost()
                self._after_failure()
                if not (lost and reused and attempt == 1):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> Any:
        plan = self._plan
        conn = self._driver.connect(*plan.connect_args, **plan.connect_kwargs)
        try:
            if plan.dialect == "sqlite":
                from .sqlite_setup import configure_sqlite_connection

                configure_sqlite_connection(conn, plan.busy_timeout_s)
            else:  # see audit.db._postgresql_engine: the head is read after the lock is granted
                conn.isolation_level = self._driver.IsolationLevel.READ_COMMITTED
        except BaseException:
            conn.close()
            raise
        self._conn, self._cursor = conn, conn.cursor()
        return self._cursor

    def _is_lost(self) -> bool:
        conn = self._conn
        return conn is not None and self._plan.dialect == "postgresql" and bool(conn.closed or conn.broken)

    def _after_failure(self) -> None:
        """Drop a lost connection, roll back a live one."""
        if self._is_lost():
            self._drop()
        else:
            self._roll_back()

    def _roll_back(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except Exception:  # noqa: BLE001 - the original error is what the caller needs
            self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def close(self) -> None:
        """Close the connection (after a running transaction); the next use connects anew."""
        if self._owner == threading.get_ident():
            return
        with self._lock:
            self._drop()

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's connection is not ours to use or to close."""
        self._lock = threading.Lock()
        self._owner = None
        self._conn = self._cursor = None


def _forget_all_after_fork() -> None:
    for connection in list(_CONNECTIONS):
        connection._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)


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

    @property
    def plan(self) -> DriverPlan:
        return self._plan

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
        check_args(kind, request_id, principal=principal, team=team, model=model, policy_revision=policy_revision)
        if kind == CHAIN_FORMAT:
            raise InvalidEntryError("chain_format entries are written by the store itself")
        body_text, stored_body = normalise_body(body)
        payload_text, stored_payload, digest = normalise_payload(payload)
        terminal_request_id = request_id if kind in TERMINAL_KINDS else None
        fields: dict[str, Any] = {
            "request_id": request_id,
            "kind": kind,
            "principal": principal,
            "team": team,
            "model": model,
            "policy_revision": policy_revision,
            "terminal_request_id": terminal_request_id,
        }
        driver = self._connection.driver
        try:
            chained = self._appender.append(fields, body_text, payload_text, digest)
        except driver.IntegrityError as exc:
            if terminal_request_id is not None:
                existing = self.terminal_for(request_id)
                if existing is not None:
                    raise DuplicateTerminalError(request_id, existing.kind) from exc
            raise AuditError(f"audit append refused by {self._plan.described}: {exc}") from exc
        except (driver.Error, OSError) as exc:
            raise AuditError(f"audit append failed on {self._plan.described}: {exc}") from exc
        return AuditEntry(seq=chained.seq, created_at=chained.created_at, body=stored_body,
                          prev_hash=chained.prev_hash, hash=chained.hash, payload=stored_payload,
                          payload_digest=digest, format=FORMAT_2, **fields)

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
