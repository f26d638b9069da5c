"""The append itself: read the head, chain the entry, insert it, in one locked transaction.

The statements are SQLAlchemy Core compiled once per engine from the
SQLModel table (:data:`audit.tables.audit_table`), so the column list and the
dialect's SQL and paramstyle come from the schema, not from hand-written
SQL; they run on the engine's DBAPI connection (:mod:`audit.dbapi`). Column
values go through each column type's own bind processor, so they are stored
exactly as a SQLAlchemy insert would store them, except ``body``: that is
the canonical JSON text the hash was computed over, stored as is (a JSON
column holds text on SQLite and parses text on PostgreSQL), so the body is
serialised once and what is stored is byte for byte what was hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Final

from sqlalchemy import Engine, select

from .chain import GENESIS_HASH, chain_hash, entry_payload_with_body
from .db import APPEND_LOCK_KEY, lock_statements
from .dbapi import dbapi_cursor
from .tables import audit_table

_t = audit_table.c
_COLUMNS: Final = tuple(column.name for column in audit_table.columns)


@dataclass(frozen=True, slots=True)
class Chained:
    """What the append decided inside the lock: the entry's place on the chain."""

    seq: int
    created_at: datetime
    prev_hash: str
    hash: str


class Appender:
    """Compiled append statements for one engine's dialect.

    Raises :class:`audit.AuditError` when built for a database the store does
    not support (only SQLite and PostgreSQL have the write lock it needs).
    """

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self._begin = lock_statements(engine, APPEND_LOCK_KEY)  # refuses other dialects first
        self._engine = engine
        head = select(_t.seq, _t.hash).order_by(_t.seq.desc()).limit(1)
        self._head_sql = str(head.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        insert = audit_table.insert().compile(dialect=dialect)
        self._insert_sql = str(insert)
        names = tuple(insert.positiontup or ()) if dialect.positional else tuple(insert.params)
        if sorted(names) != sorted(_COLUMNS):  # a renamed bind would silently insert NULL
            raise RuntimeError(f"compiled audit insert binds {names}, expected the columns {_COLUMNS}")
        self._positional = dialect.positional
        self._names = names
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name in _COLUMNS:
            if name == "body":
                continue  # bound as the canonical text itself, never re-serialised
            processor = audit_table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def append(self, fields: dict[str, Any], body_text: str) -> Chained:
        """Put one entry at the head of the chain; ``fields`` are the caller's columns.

        ``fields`` holds ``request_id``, ``kind``, ``principal``, ``team``,
        ``model``, ``policy_revision`` and ``terminal_request_id``;
        ``body_text`` is the body's canonical JSON. The write lock is held
        from the head read to commit, and ``created_at`` is taken under it,
        so entries are numbered and timed in one order across processes.
        Database errors leave as SQLAlchemy exceptions (see :mod:`audit.dbapi`).
        """
        with dbapi_cursor(self._engine, begin=self._begin) as cursor:
            cursor.execute(self._head_sql)
            head = cursor.fetchone()
            seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
            row = {**fields, "seq": seq, "created_at": datetime.now(timezone.utc), "prev_hash": prev_hash}
            entry_hash = chain_hash(prev_hash, entry_payload_with_body(row, body_text))
            chained = Chained(seq, row["created_at"], prev_hash, entry_hash)
            row["hash"] = entry_hash
            row["body"] = body_text
            row["payload"] = row["payload_digest"] = None
            for name, processor in self._processors.items():
                row[name] = processor(row[name])
            cursor.execute(self._insert_sql, [row[n] for n in self._names] if self._positional else row)
        return chained
