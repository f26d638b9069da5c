"""The audit table: one row per entry, append-only, hash-chained.

The schema itself enforces the chain's rules (no fork, one terminal entry
per request, no UPDATE or DELETE); see docs/architecture.md, "Audit entries
and the chain". A change here needs a migration under
``audit/migrations/versions``; ``tests/audit/test_audit_store.py`` checks they agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Column, Integer, MetaData, String
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from .kinds import KINDS, TERMINAL_KINDS, sql_in_list
from .sqltypes import UTCDateTime

TABLE_NAME = "audit_entries"

#: Length limit for ids and names; checked in the store so overlong values
#: give a clear error on every backend rather than a PostgreSQL truncation error.
NAME_LEN = 255

#: Deterministic constraint names, needed for later ALTERs (SQLite batch mode).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

audit_metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only treats a column typed exactly INTEGER as the rowid alias.
_SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")

# The explicit IS NOT NULL matters: a CHECK whose expression is NULL passes,
# and ``NULL = request_id`` is NULL, not false.
KIND_CHECK = f"kind IN {sql_in_list(KINDS)}"
TERMINAL_CHECK = (
    f"(kind IN {sql_in_list(TERMINAL_KINDS)}"
    " AND terminal_request_id IS NOT NULL AND terminal_request_id = request_id)"
    f" OR (kind NOT IN {sql_in_list(TERMINAL_KINDS)} AND terminal_request_id IS NULL)"
)


class AuditModel(SQLModel, registry=registry(metadata=audit_metadata)):
    """Abstract base binding audit tables to :data:`audit_metadata`."""


class AuditEntryRow(AuditModel, table=True):
    """One audit entry as stored. Callers get :class:`audit.entry.AuditEntry` instead."""

    __tablename__ = TABLE_NAME
    __table_args__ = (
        CheckConstraint(KIND_CHECK, name="kind"),
        CheckConstraint(TERMINAL_CHECK, name="terminal"),
    )

    seq: int = Field(sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    request_id: str = Field(sa_column=Column(String(NAME_LEN), nullable=False, index=True))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    principal: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    team: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    model: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    body: dict[str, Any] = Field(sa_column=Column(JSON(), nullable=False))
    policy_revision: str | None = Field(
        default=None, sa_column=Column(String(NAME_LEN), nullable=True)
    )
    terminal_request_id: str | None = Field(
        default=None, sa_column=Column(String(NAME_LEN), nullable=True, unique=True)
    )
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


audit_table = AuditEntryRow.__table__
