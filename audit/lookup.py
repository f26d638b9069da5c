"""Keyed look-ups of whole entries, compiled once and run on the engine's DBAPI connection.

``terminal_for`` runs on every request's way out (and, for a redelivered
job, on its way in); through a SQLAlchemy ``Connection`` it costs several
times what SQLite spends on the indexed read. The statement is compiled
once from the SQLModel table; each column's value goes through its type's
own result processor for the engine's dialect (JSON parsed, timestamps made
aware UTC by :class:`audit.sqltypes.UTCDateTime`), so an entry reads back
exactly as the Core path reads it.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Column, Engine, bindparam, select

from .dbapi import dbapi_cursor
from .entry import AuditEntry
from .errors import CorruptEntryError
from .tables import audit_table

_KEY = "key"


class KeyedLookup:
    """``SELECT <every column> FROM audit_entries WHERE <column> = :key`` for one engine."""

    def __init__(self, engine: Engine, column: Column[Any], format_of: Callable[[int], int]) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._format_of = format_of  # the chain format of an entry, by its seq
        compiled = select(audit_table).where(column == bindparam(_KEY)).compile(dialect=dialect)
        self._sql = str(compiled)
        self._positional = dialect.positional
        self._names = tuple(c.name for c in audit_table.columns)  # the select's column order
        # No driver type codes are known before the first row; none of these column types needs one
        # (pysqlite reports none at all).
        self._processors: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
            (i, processor) for i, c in enumerate(audit_table.columns)
            if (processor := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None)

    def rows(self, key: Any) -> list[AuditEntry]:
        """Every entry whose column equals ``key``, in no particular order.

        Raises :class:`CorruptEntryError` for a row that no longer decodes,
        and SQLAlchemy exceptions for database errors (see :mod:`audit.dbapi`).
        """
        with dbapi_cursor(self._engine) as cursor:
            cursor.execute(self._sql, (key,) if self._positional else {_KEY: key})
            try:
                raw_rows = cursor.fetchall()
            except self._engine.dialect.loaded_dbapi.DataError as exc:
                # The driver could not load a value (PostgreSQL: a created_at of 'infinity').
                raise CorruptEntryError(None, str(exc)) from exc
        return [self._entry(row) for row in raw_rows]

    def _entry(self, row: Any) -> AuditEntry:
        values = list(row)
        try:
            for i, processor in self._processors:
                values[i] = processor(values[i])
        except (ValueError, TypeError) as exc:
            # Result processing (JSON, timestamps) choked on a tampered row.
            raise CorruptEntryError(None, str(exc)) from exc
        fields = dict(zip(self._names, values))
        return AuditEntry(**fields, format=self._format_of(fields["seq"]))
