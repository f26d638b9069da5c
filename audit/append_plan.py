"""The append's statements and a driver's connection settings, compiled from the SQLModel table and the engine.

Where SQLAlchemy is loaded (the gateway, the CLI, a worker's short-lived
store-prep child) the store compiles its statements here once per engine:
the column list, the dialect's SQL and paramstyle come from the schema, not
from hand-written SQL. :func:`driver_plan` adds what a process needs to open
the same database on the driver alone (:mod:`audit.driver_store`): the
connect arguments SQLAlchemy's dialect would pass the driver, the statements,
the keyed look-up of a request's terminal entry and the boundary's look-up,
all plain data a parent process can be handed as JSON.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final

from sqlalchemy import Engine, bindparam, select

from .appender import CREATED_AT_DATETIME, CREATED_AT_SQLITE_TEXT, AppendStatements, sqlite_text
from .chain import format_timestamp
from .db import APPEND_LOCK_KEY, busy_timeout_s, connect_args_of, describe, lock_statements
from .driver_plan import DriverPlan
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID
from .tables import audit_table

_t = audit_table.c
_COLUMNS: Final = tuple(column.name for column in audit_table.columns)
#: Bound as the canonical text itself, never re-serialised (audit/appender.py).
_TEXT_COLUMNS: Final = ("body", "payload")


def append_statements(engine: Engine) -> AppendStatements:
    """The append's SQL for ``engine``'s dialect; AuditError for a database the store does not support.

    Only SQLite and PostgreSQL have the write lock the append needs
    (:func:`audit.db.lock_statements` refuses the others first).
    """
    dialect = engine.dialect
    begin = lock_statements(engine, APPEND_LOCK_KEY)
    head = select(_t.seq, _t.hash, _t.created_at).order_by(_t.seq.desc()).limit(1)
    head_sql = str(head.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    insert = audit_table.insert().compile(dialect=dialect)
    names = tuple(insert.positiontup or ()) if dialect.positional else tuple(insert.params)
    if sorted(names) != sorted(_COLUMNS):  # a renamed bind would silently insert NULL
        raise RuntimeError(f"compiled audit insert binds {names}, expected the columns {_COLUMNS}")
    processors = {}
    for name in _COLUMNS:
        if name in _TEXT_COLUMNS:
            continue
        processor = audit_table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    created_at = _created_at_binding(processors.pop("created_at", None), dialect.name)
    if processors:  # only created_at needs one today; a new typed column must be bound here too
        raise RuntimeError(f"audit columns {sorted(processors)} need bind processing the append lacks")
    return AppendStatements(head_sql=head_sql, insert_sql=str(insert), names=names, positional=dialect.positional,
                            begin=begin, created_at=created_at)


def _created_at_binding(processor: Any, dialect_name: str) -> str:
    """How ``created_at`` is bound, checked against the column type's own bind processor.

    On SQLite the processor makes the text ``YYYY-MM-DD HH:MM:SS.ffffff`` of
    the UTC time, which is the hashed ISO form with the ``T`` and the offset
    cut out; elsewhere it hands the aware UTC datetime to the driver. A
    processor that does anything else refuses the appender rather than bind
    a value the column type would not have written.
    """
    samples = (datetime(2024, 2, 29, 23, 59, 58, 7, tzinfo=timezone.utc), datetime(1, 1, 1, tzinfo=timezone.utc))
    if dialect_name == "sqlite":
        if processor is not None and all(processor(s) == sqlite_text(format_timestamp(s)) for s in samples):
            return CREATED_AT_SQLITE_TEXT
    elif processor is None or all(processor(s) == s for s in samples):
        return CREATED_AT_DATETIME
    raise RuntimeError(f"the audit created_at column binds in a way the append does not reproduce ({dialect_name})")


def driver_plan(engine: Engine) -> DriverPlan:
    """What :class:`audit.driver_store.DriverStore` needs to append to and read ``engine``'s database."""
    dialect = engine.dialect
    cargs, cparams = dialect.create_connect_args(engine.url)
    cparams = {k: v for k, v in cparams.items() if k != "context"}  # psycopg's adapters map: SQLAlchemy's own
    cparams.update(connect_args_of(engine))
    terminal = select(audit_table).where(_t.terminal_request_id == bindparam("key")).compile(dialect=dialect)
    boundary = (select(_t.seq).where(_t.request_id == CHAIN_FORMAT_REQUEST_ID, _t.kind == CHAIN_FORMAT)
                .order_by(_t.seq).limit(1).compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    return DriverPlan(dialect=dialect.name, connect_args=tuple(cargs), connect_kwargs=cparams,
                      busy_timeout_s=busy_timeout_s(engine), described=describe(engine),
                      append=append_statements(engine), terminal_sql=str(terminal), boundary_sql=str(boundary),
                      columns=_COLUMNS)
