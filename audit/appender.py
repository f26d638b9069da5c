"""The append itself: read the head, chain the entry, insert it, in one locked transaction.

The statements are SQLAlchemy Core compiled once per engine from the
SQLModel table (:data:`audit.tables.audit_table`), so the column list and the
dialect's SQL and paramstyle come from the schema, not from hand-written
SQL; they run on the engine's DBAPI connection (:mod:`audit.dbapi`). Column
values go through each column type's own bind processor, so they are stored
exactly as a SQLAlchemy insert would store them, except ``body`` and
``payload``: the body is the canonical JSON text the hash was computed
over, the payload the canonical text its digest was computed over, both
stored as is (a JSON column holds text on SQLite and keeps the text on
PostgreSQL), so each is serialised once and what is stored is byte for byte
what was hashed.

Entries are hashed in format 2 (:mod:`audit.chain`). On an empty store the
first append first writes the ``chain_format`` boundary entry (seq 1, format
1, as every boundary is) in the same transaction; a store that held entries
when it was upgraded got its boundary from the migration (audit_0002). So
the only check on the hot path is the head read that was there anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Final

from sqlalchemy import Engine, select

from .chain import FORMAT_1, FORMAT_2, GENESIS_HASH, canonical_text, chain_hash, entry_payload_with_body
from .db import APPEND_LOCK_KEY, lock_statements
from .dbapi import dbapi_cursor
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID
from .tables import audit_table

_t = audit_table.c
_COLUMNS: Final = tuple(column.name for column in audit_table.columns)
#: Bound as the canonical text itself, never re-serialised.
_TEXT_COLUMNS: Final = ("body", "payload")
#: The boundary entry every format-2 chain has (its body, hashed in format 1).
BOUNDARY_BODY_TEXT: Final = canonical_text({"format": FORMAT_2})
_BOUNDARY_FIELDS: Final = {"request_id": CHAIN_FORMAT_REQUEST_ID, "kind": CHAIN_FORMAT, "principal": None,
                           "team": None, "model": None, "policy_revision": None, "terminal_request_id": None}


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
            if name in _TEXT_COLUMNS:
                continue
            processor = audit_table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def append(self, fields: dict[str, Any], body_text: str, payload_text: str | None,
               payload_digest: str | None) -> Chained:
        """Put one entry at the head of the chain; ``fields`` are the caller's columns.

        ``fields`` holds ``request_id``, ``kind``, ``principal``, ``team``,
        ``model``, ``policy_revision`` and ``terminal_request_id``;
        ``body_text`` is the body's canonical JSON, ``payload_text`` the
        payload's (or None) and ``payload_digest`` its digest. The write lock
        is held from the head read to commit, and ``created_at`` is taken
        under it, so entries are numbered and timed in one order across
        processes. Database errors leave as SQLAlchemy exceptions (see :mod:`audit.dbapi`).
        """
        with dbapi_cursor(self._engine, begin=self._begin) as cursor:
            cursor.execute(self._head_sql)
            head = cursor.fetchone()
            now = datetime.now(timezone.utc)
            if head is None:  # a new store: its first entry is the format boundary
                boundary = self._insert(cursor, {**_BOUNDARY_FIELDS, "payload_digest": None}, 1, GENESIS_HASH, now,
                                        BOUNDARY_BODY_TEXT, None, FORMAT_1)
                head = (boundary.seq, boundary.hash)
            chained = self._insert(cursor, {**fields, "payload_digest": payload_digest}, head[0] + 1, head[1], now,
                                   body_text, payload_text, FORMAT_2)
        return chained

    def _insert(self, cursor: Any, fields: dict[str, Any], seq: int, prev_hash: str, now: datetime,
                body_text: str, payload_text: str | None, format: int) -> Chained:
        row = {**fields, "seq": seq, "created_at": now, "prev_hash": prev_hash}
        if format == FORMAT_1:
            del row["payload_digest"]
        entry_hash = chain_hash(prev_hash, entry_payload_with_body(row, body_text, format=format))
        chained = Chained(seq, now, prev_hash, entry_hash)
        row["hash"] = entry_hash
        row["body"] = body_text
        row["payload"] = payload_text
        row["payload_digest"] = fields["payload_digest"]
        for name, processor in self._processors.items():
            row[name] = processor(row[name])
        cursor.execute(self._insert_sql, [row[n] for n in self._names] if self._positional else row)
        return chained
