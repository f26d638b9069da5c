"""A timestamp column type that always hands back aware UTC datetimes.

The chain hashes timestamps as ISO-8601 UTC strings with microseconds, so a
value must read back *exactly* as it was written, on every backend. SQLite
has no time zones (SQLAlchemy stores naive ``YYYY-MM-DD HH:MM:SS.ffffff``
text) while PostgreSQL's ``timestamptz`` returns values in the session's
zone; this type normalises both to aware UTC so the hash input is the same.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that refuses naive input and returns aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            # A naive time is ambiguous; guessing would make hashes unverifiable.
            raise ValueError("audit timestamps must be timezone-aware")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
