"""Engines, the append lock and schema migration for the audit store.

The lock is taken before the head is read, so that every process appending
to the database extends one chain; see docs/architecture.md, "Audit entries
and the chain", and the SQLite notes at :func:`_install_sqlite_hooks`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Iterator

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import stall_watch
from .errors import AuditError
from .kept_connection import socket_closed
from .migration_heads import at_head
from .postgresql_setup import configure_postgresql_connection
from .sqlite_setup import SQLITE_CACHE_KIB, configure_sqlite_connection  # noqa: F401  (SQLITE_CACHE_KIB re-exported)

if TYPE_CHECKING:
    from alembic.config import Config

#: How long a SQLite writer waits for the lock before giving up (fail closed), unless the
#: engine was made with another (``GOVGATE_DATABASE_BUSY_TIMEOUT_S``, :func:`make_engine`).
BUSY_TIMEOUT_S: Final = 30.0
#: The longest busy timeout accepted: a day (SQLite takes it in milliseconds as a C int, 24.8 days at most).
MAX_BUSY_TIMEOUT_S: Final = 86400.0
#: How long connecting to a PostgreSQL server may take before the store gives up (fail closed).
PG_CONNECT_TIMEOUT_S: Final = 10
#: The SQLAlchemy driver for a ``postgresql://`` URL that names none.
POSTGRESQL_DRIVER: Final = "postgresql+psycopg"
#: Alembic version table of the audit schema (the gateway keeps its own).
VERSION_TABLE: Final = "alembic_version_audit"
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"


#: Fixed PostgreSQL advisory lock keys ("govgate audit" in spirit; any constant works).
APPEND_LOCK_KEY: Final = 0x60_6A_7E_A0_D1_70_00_01
MIGRATE_LOCK_KEY: Final = 0x60_6A_7E_A0_D1_70_00_02

#: Errors that mean "the database did not do what we asked"; translated to AuditError.
DB_ERRORS: Final = (SQLAlchemyError, sqlite3.Error, OSError)

_BEGIN_OPTION: Final = "govgate_audit_begin"

#: The longest a session holding the append lock may leave the server waiting for its next statement before
#: the server ends the session and the lock with it (PostgreSQL's ``idle_in_transaction_session_timeout``, set
#: for the append's transaction only): see :func:`append_idle_limit_s`.
APPEND_IDLE_LIMIT_S: Final = 5.0

#: The busy timeout each engine was made with, so every wait on its database uses the same one.
_BUSY_TIMEOUTS: "weakref.WeakKeyDictionary[Engine, float]" = weakref.WeakKeyDictionary()
#: The driver arguments each engine was made with beyond its URL's (:func:`connect_args_of`).
_CONNECT_ARGS: "weakref.WeakKeyDictionary[Engine, dict[str, Any]]" = weakref.WeakKeyDictionary()


def busy_timeout_s(engine: Engine) -> float:
    """How long waits on ``engine``'s database lock may last (:func:`make_engine`'s ``busy_timeout_s``).

    Kept beside the engine rather than re-read from the settings: ``audit``
    does not import ``gateway``, and the writer's wait for its own process's
    appends (:mod:`audit.writer`) must match SQLite's wait for other processes'.
    An engine made elsewhere gets the default.
    """
    return _BUSY_TIMEOUTS.get(engine, BUSY_TIMEOUT_S)


def append_idle_limit_s(busy_timeout: float) -> float:
    """How long the server lets an append's transaction sit idle, holding the append lock (PostgreSQL).

    A writer cut off inside the lock (a partition that drops its packets, FINs
    included; a frozen process) left its session "idle in transaction" on the
    server, holding the lock until TCP keepalive ended it, ~2 h by default:
    every replica's and worker's appends waited behind it and failed at their
    busy timeout (probe r1 F1). An append's statements follow one another
    within milliseconds, so a gap of :data:`APPEND_IDLE_LIMIT_S` means the
    writer is gone; half the busy timeout when that is shorter, so a waiter
    that queued behind the dead writer gets the lock before its own
    ``lock_timeout`` (the busy timeout) refuses it.
    """
    return min(APPEND_IDLE_LIMIT_S, busy_timeout / 2)


def _append_lock_sql(engine: Engine, lock_key: int) -> str:
    """The PostgreSQL statement that takes ``lock_key`` for the transaction: one round trip, which for the
    append lock also bounds the transaction's idle time (:func:`append_idle_limit_s`; ``set_config(…, true)``
    is ``SET LOCAL``: it ends with the transaction)."""
    lock = f"pg_advisory_xact_lock({int(lock_key)})"
    if lock_key != APPEND_LOCK_KEY:
        return f"SELECT {lock}"
    idle_ms = max(1, round(append_idle_limit_s(busy_timeout_s(engine)) * 1000))
    return f"SELECT set_config('idle_in_transaction_session_timeout', '{idle_ms}', true), {lock}"


def connect_args_of(engine: Engine) -> dict[str, Any]:
    """The arguments :func:`make_engine` gave the driver's connect beyond the URL's (timeouts, encoding).

    What a process opening the same database on the driver alone must pass
    too (:func:`audit.append_plan.driver_plan`); empty for an engine made elsewhere.
    """
    return dict(_CONNECT_ARGS.get(engine, {}))


def describe(engine: Engine) -> str:
    """The engine's URL without password, for error messages."""
    return engine.url.render_as_string(hide_password=True)


def reason(exc: BaseException) -> str:
    """The driver's message when there is one (SQLAlchemy's adds SQL and a link)."""
    return str(getattr(exc, "orig", None) or exc)


def write_refusal(connection: Connection) -> str | None:
    """Why ``connection``'s database would refuse the audit's writes, as far as a read can tell; None if not.

    For a readiness probe: a PostgreSQL standby (in recovery), or one whose
    transactions are read-only (``default_transaction_read_only``, what a
    failover to the wrong server or maintenance leaves), answers ``SELECT 1``
    and refuses every append. On SQLite a read-only file or a full disk shows
    only when a write fails (``SELECT 1`` here, as before). On PostgreSQL
    also a lock another session holds on the audit table that every
    append's INSERT would wait for (:func:`_table_lock_refusal`), and the
    append lock held by a session that has stopped sending statements (a
    writer cut off or frozen inside it: :func:`_stuck_append_lock_refusal`).
    """
    if connection.dialect.name != "postgresql":
        connection.execute(text("SELECT 1"))
        return None
    in_recovery, read_only = connection.execute(
        text("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")).one()
    if in_recovery:
        return "the server is a standby in recovery (read-only)"
    if read_only == "on":
        return "its transactions are read-only (default_transaction_read_only is on)"
    return _stuck_append_lock_refusal(connection) or _table_lock_refusal(connection)


#: How long a session may hold the append lock idle before readiness calls it stuck: an append's own gaps
#: between statements are milliseconds.
STUCK_APPEND_LOCK_S: Final = 1.0


def _stuck_append_lock_refusal(connection: Connection) -> str | None:
    """Whether a session has held the append lock, idle in its transaction, for more than
    :data:`STUCK_APPEND_LOCK_S` (PostgreSQL); None if not.

    Every append waits for that session, then fails at its busy timeout,
    until the server ends it (after :func:`append_idle_limit_s` for govgate's
    own sessions; a foreign session holding the key, never). Read from
    ``pg_locks`` and ``pg_stat_activity`` without taking the lock, so the
    probe never queues behind live appends. A session of another role may
    hide its state (``pg_read_all_stats``): then nothing is reported here,
    and the appends' own refusals still say it.
    """
    row = connection.execute(text(
        "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.state_change) FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = :key "
        "AND a.state IN ('idle in transaction', 'idle in transaction (aborted)') AND a.pid <> pg_backend_pid()"),
        {"key": APPEND_LOCK_KEY}).first()
    if row is None or row[1] is None or float(row[1]) <= STUCK_APPEND_LOCK_S:
        return None
    return (f"a session (pid {row[0]}) has held the append lock for {float(row[1]):.0f} s without a statement "
            "(a writer cut off or stopped): appends wait for it, then fail")


#: How long the readiness probe waits for the lock an append's INSERT takes on the table.
READY_LOCK_WAIT_MS: Final = 500


def _table_lock_refusal(connection: Connection) -> str | None:
    """Whether another session holds a lock that holds every append (PostgreSQL); None if not.

    An INSERT takes ROW EXCLUSIVE on the table; a ``LOCK TABLE`` (or a long
    ``ALTER TABLE``, ``CREATE INDEX``…) by another session conflicts with it,
    and every append waits, then fails after the lock timeout. The probe
    takes that lock in the probe's transaction, waiting half a second, and
    rolls back.
    """
    from .tables import TABLE_NAME

    try:
        connection.execute(text(f"SET LOCAL lock_timeout = {READY_LOCK_WAIT_MS}"))
        connection.execute(text(f"LOCK TABLE {TABLE_NAME} IN ROW EXCLUSIVE MODE"))
    except SQLAlchemyError as exc:
        state = getattr(getattr(exc, "orig", None), "sqlstate", None)
        if state == "42P01":  # undefined_table: not migrated yet, nothing to wait for
            return None
        if state != "55P03":  # lock_not_available
            raise
        return "another session holds a lock on the audit table (appends wait for it, then fail)"
    finally:
        connection.rollback()
    return None


def make_engine(url: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Engine:
    """Create an engine for the audit store (SQLite tuned for many processes).

    ``busy_timeout_s`` is how long a write waits for a locked database before
    it fails (closed): SQLite's busy handler, switching a fresh file to WAL,
    and (both backends) a thread's wait for this process's other appends
    (:func:`busy_timeout_s` tells it to :mod:`audit.writer`).

    For PostgreSQL see :func:`_postgresql_engine`. For SQLite: WAL (readers never block the writer), ``busy_timeout`` so
    contending writers queue instead of failing, ``synchronous=NORMAL`` (safe
    with WAL: a power cut may lose the last commits, never corrupt), foreign
    keys on, and SQLAlchemy-controlled ``BEGIN`` so :func:`locked_transaction`
    can use ``BEGIN IMMEDIATE``. The file's parent folder is created.
    Raises :class:`AuditError` for a malformed URL or an uncreatable folder.
    """
    if not 0 < busy_timeout_s <= MAX_BUSY_TIMEOUT_S:  # also refuses NaN
        raise AuditError(f"the audit database's busy timeout must be more than 0 s and at most "
                         f"{MAX_BUSY_TIMEOUT_S:g} s, not {busy_timeout_s!r}")
    try:
        sa_url = _parse_url(url)
        connect_args: dict[str, Any] = {}
        if sa_url.get_backend_name() == "postgresql":
            engine, connect_args = _postgresql_engine(sa_url, busy_timeout_s)
        elif sa_url.get_backend_name() != "sqlite":
            engine = create_engine(sa_url, pool_pre_ping=True)
        else:
            _create_parent_dir(sa_url)
            connect_args = {"timeout": busy_timeout_s}
            engine = create_engine(sa_url, connect_args=connect_args)
            _install_sqlite_hooks(engine, busy_timeout_s)
    except (ArgumentError, SQLAlchemyError, ImportError) as exc:
        # Unparseable URL, unknown dialect, or its driver is not installed.
        raise AuditError(f"cannot use audit database URL {_without_password(url)!r}: {exc}") from exc
    _BUSY_TIMEOUTS[engine] = busy_timeout_s
    _CONNECT_ARGS[engine] = connect_args
    return engine


def _parse_url(url: str) -> URL:
    """SQLAlchemy's URL for ``url``; a port that is not a number (``host:1:2``) is an :class:`AuditError`, where
    ``make_url``'s ``int()`` raised a ``ValueError`` that every command showed as a traceback (h9 F6)."""
    try:
        return make_url(url)
    except ValueError as exc:
        raise AuditError(f"cannot use audit database URL {_without_password(url)!r}: its port is not a number "
                         f"({exc})") from None


def _without_password(url: str) -> str:
    """The URL as an error message may show it (``audit`` imports nothing of ``gateway``, whose settings do the same)."""
    return re.sub(r"(//[^:/@]*:)[^/]*@", r"\1***@", url)


def _postgresql_engine(sa_url: URL, busy_timeout_s: float) -> tuple[Engine, dict[str, Any]]:
    """An engine for PostgreSQL through psycopg 3 (the driver govgate depends on).

    - ``postgresql://`` names no driver, and SQLAlchemy's default for it is
      psycopg2, which govgate does not install: it means psycopg 3 here.
    - ``READ COMMITTED`` whatever the server's ``default_transaction_isolation``:
      the append reads the head *after* the advisory lock is granted, and only
      in READ COMMITTED does that read see the commit of the writer it waited
      for. Under REPEATABLE READ the snapshot is taken at the lock statement,
      before the wait, and the append would fork the chain (refused by the
      unique ``prev_hash``, so appends would fail under contention).
    - UTF-8 as the client encoding (see :func:`_check_encoding` for the server's).
    - A connect timeout, so an unreachable server fails requests closed
      instead of holding them for the operating system's TCP timeout.
    - ``pool_pre_ping``: a server restart costs one ping, not a failed append.
    - ``lock_timeout`` = the busy timeout: a lock another session holds (a
      reviewer's ``LOCK TABLE``, a long transaction's strong lock, a writer
      stopped inside the append's advisory lock) fails the append closed
      after that long, as SQLite's busy timeout does, instead of holding
      every request with no end. Set as a startup option (beside the URL's
      own ``options``), so the workers' driver connections get it too
      (:func:`connect_args_of`); :func:`locked_transaction` lifts it for the
      migrations' queue.
    - Commits durable on the server even where ``synchronous_commit`` is
      ``off`` (:mod:`audit.postgresql_setup`).
    - Every wait for the server on a pooled connection (a statement, the
      pre-ping) bounded at the busy timeout plus
      :data:`audit.stall_watch.GRACE_S`, unless the server, asked then,
      says it is still running the statement, so a server that stops
      answering (frozen, a partition) fails reads closed instead of holding
      them, and a slow statement is not cut (:mod:`audit.answer_watch`).
    """
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername=POSTGRESQL_DRIVER)
    # UTF-8 on the wire whatever the database's encoding: under SQL_ASCII psycopg would
    # hand back bytes, which SQLAlchemy's first connect cannot even parse the version from.
    connect_args: dict[str, Any] = {"client_encoding": "utf8"}
    if "connect_timeout" not in sa_url.query:
        connect_args["connect_timeout"] = int(PG_CONNECT_TIMEOUT_S)
    own_options = sa_url.query.get("options", "")
    if not isinstance(own_options, str):  # the query named it twice: libpq would take the last
        own_options = own_options[-1]
    lock_timeout = f"-c lock_timeout={max(1, round(busy_timeout_s * 1000))}"
    connect_args["options"] = f"{own_options} {lock_timeout}".strip()
    engine = create_engine(sa_url, pool_pre_ping=True, isolation_level="READ COMMITTED", connect_args=connect_args)

    if engine.dialect.driver == "psycopg":  # the one driver whose waits can be watched (audit.answer_watch)
        answer_s = busy_timeout_s + stall_watch.GRACE_S

        @event.listens_for(engine, "do_connect")
        def _watched_connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
            from .answer_watch import connect_watched

            return connect_watched(answer_s, cargs, cparams)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        configure_postgresql_connection(dbapi_conn)

    @event.listens_for(engine, "handle_error")
    def _socket_closed_is_a_disconnect(context: Any) -> None:
        # psycopg's word for a socket that failed before libpq marked the session broken: SQLAlchemy's
        # disconnect test says no, and a pooled session's pre-ping then failed the read instead of
        # replacing the session (the writer's kept session reads it the same way: audit.kept_connection).
        if socket_closed(context.original_exception):
            context.is_disconnect = True

    return engine, connect_args


def sqlite_file(sa_url: URL) -> Path | None:
    """The database file a SQLite URL names, or None for in-memory databases."""
    database = sa_url.database or ""
    if sa_url.query.get("uri") in ("true", "1", "True"):
        if not database.startswith("file:"):
            return None
        database = database[len("file:") :].split("?", 1)[0]
        if sa_url.query.get("mode") == "memory":
            return None
    if database in ("", ":memory:"):
        return None
    return Path(database).expanduser()


def _create_parent_dir(sa_url: URL) -> None:
    """Create the database's folder (0700) and the file itself (0600) if they are missing.

    The log holds prompts (as far as the policy allows): only its owner may
    read it. SQLite gives the ``-wal`` and ``-shm`` files the mode of the
    database file, so creating that one private keeps all three private.
    """
    path = sqlite_file(sa_url)
    if path is None:
        return
    try:
        for folder in reversed([p for p in (path.parent, *path.parent.parents) if not p.exists()]):
            folder.mkdir(mode=0o700, exist_ok=True)  # each one, so parents are private too
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise AuditError(f"cannot create folder for audit database {path}: {exc}") from exc


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float) -> None:
    # pysqlite's default ("legacy") transaction control issues its own deferred
    # BEGIN, and only before DML; a deferred transaction that later writes in
    # WAL mode can fail with SQLITE_BUSY without waiting. So pysqlite's BEGIN is
    # switched off (isolation_level = None) and SQLAlchemy's "begin" event emits
    # BEGIN or BEGIN IMMEDIATE itself (the recipe in SQLAlchemy's SQLite docs;
    # it works on every Python version).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        configure_sqlite_connection(dbapi_conn, busy_timeout_s)  # BEGIN is _on_begin's below

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_BEGIN_OPTION) == "IMMEDIATE"
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def lock_statements(engine: Engine, lock_key: int = APPEND_LOCK_KEY) -> tuple[str, ...]:
    """What a DBAPI-level transaction runs first to hold the write lock (see :mod:`audit.dbapi`).

    The same lock :func:`locked_transaction` takes, spelt as raw SQL for a
    driver connection that SQLAlchemy does not begin: SQLite ``BEGIN
    IMMEDIATE`` (the engine's connections leave ``BEGIN`` to us), PostgreSQL
    the advisory lock inside the driver's implicit transaction.
    """
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return ("BEGIN IMMEDIATE",)
    if dialect == "postgresql":
        return (_append_lock_sql(engine, lock_key),)
    raise AuditError(f"audit store supports SQLite and PostgreSQL, not {dialect}")


@contextmanager
def locked_transaction(engine: Engine, lock_key: int = APPEND_LOCK_KEY) -> Iterator[Connection]:
    """A transaction that holds the store's write lock from its first statement.

    Commits when the block exits normally, rolls back on an exception. Only
    one such transaction per ``lock_key`` runs at a time across all processes.
    Database errors propagate unchanged; callers translate them.

    Waits for the lock at most the busy timeout (SQLite's busy handler,
    PostgreSQL's ``lock_timeout``), except a migration's on PostgreSQL
    (``MIGRATE_LOCK_KEY``, the gateway's too): processes starting together
    queue behind the one that migrates, however long its upgrade takes
    (its round trips are :func:`audit.stall_watch.patient`: neither that
    wait nor a long ``ALTER`` is taken for a server that stopped answering).
    """
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise AuditError(f"audit store supports SQLite and PostgreSQL, not {dialect}")
    if lock_key == APPEND_LOCK_KEY:
        with _locked(engine, dialect, lock_key) as conn:
            yield conn
    else:
        with stall_watch.patient(), _locked(engine, dialect, lock_key) as conn:
            yield conn


@contextmanager
def _locked(engine: Engine, dialect: str, lock_key: int) -> Iterator[Connection]:
    with engine.connect() as conn:
        if dialect == "sqlite":
            conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            if dialect == "postgresql":
                if lock_key != APPEND_LOCK_KEY:  # a migration: wait as long as the one running takes
                    conn.execute(text("SET LOCAL lock_timeout = 0"))
                conn.exec_driver_sql(_append_lock_sql(engine, lock_key))
            yield conn


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for the audit migrations, built in code (no alembic.ini).

    Also the entry point for writing new revisions, e.g.
    ``command.revision(alembic_config(conn), "message", autogenerate=True)``.
    """
    from alembic.config import Config  # Alembic only where migrations run: processes that append never load it

    config = Config()
    # ConfigParser interpolation: a literal % in the path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def migration_options() -> dict[str, Any]:
    """Alembic context options for the audit schema (used by env.py and schema checks).

    Own version table, and autogenerate only looks at audit tables, so the
    gateway's tables and history in the same database are never touched.
    """
    from .tables import audit_metadata  # the tables import SQLModel; only needed here

    def include_name(name: str | None, type_: str, _parents: Any) -> bool:
        return type_ != "table" or name in audit_metadata.tables

    return {
        "target_metadata": audit_metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "render_as_batch": True,  # SQLite needs table rebuilds for most ALTERs
        "compare_type": True,
    }


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the audit schema up to ``revision``; safe to call repeatedly and concurrently.

    The whole upgrade runs inside :func:`locked_transaction` (SQLite and
    PostgreSQL both have transactional DDL), so processes starting together
    queue up: the first creates the schema, the others find it current.
    A schema already at head is told without Alembic
    (:mod:`audit.migration_heads`): Alembic is imported only when there is
    something to do (about 11 MB and 0.2 CPU-s that would stay resident in
    every process that opens the store, the API included).
    """
    try:
        if revision == "head":
            with engine.connect() as conn:
                _check_encoding(conn)
                if at_head(conn, MIGRATIONS_DIR / "versions", VERSION_TABLE):
                    return
    except DB_ERRORS as exc:
        raise AuditError(f"cannot migrate audit schema in {describe(engine)}: {reason(exc)}") from exc
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        with locked_transaction(engine, MIGRATE_LOCK_KEY) as conn:
            _check_encoding(conn)
            command.upgrade(alembic_config(conn), revision)
    except (*DB_ERRORS, CommandError, RuntimeError) as exc:  # RuntimeError: a migration refusing to run
        raise AuditError(f"cannot migrate audit schema in {describe(engine)}: {reason(exc)}") from exc


def _check_encoding(conn: Connection) -> None:
    """Refuse a PostgreSQL database that does not store UTF-8.

    A body is hashed as UTF-8 canonical JSON and must read back as the same
    characters; a ``SQL_ASCII`` or ``LATIN1`` database would refuse or
    mangle non-ASCII text (``CREATE DATABASE … ENCODING 'UTF8'`` makes one
    that fits; Debian's clusters are UTF-8 under a UTF-8 locale).
    """
    if conn.dialect.name != "postgresql":
        return
    encoding = conn.exec_driver_sql("SHOW server_encoding").scalar()
    if encoding != "UTF8":
        raise AuditError(f"the audit database must use the UTF8 encoding, not {encoding} "
                         f"(create it with ENCODING 'UTF8')")
