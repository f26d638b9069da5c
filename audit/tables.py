"""The audit table: one row per entry, append-only, hash-chained.

Rules the *schema* enforces (so they hold whichever process writes):

* ``seq`` is the primary key and ``prev_hash`` is UNIQUE, so the chain cannot
  fork: no two entries share a position or claim the same predecessor.
* ``terminal_request_id`` is set only on terminal entries (CHECK) and is
  UNIQUE, so a request can have at most one terminal entry.
* ``kind`` is one of :data:`audit.kinds.KINDS` (CHECK).
* Rows cannot be updated or deleted: the migration installs triggers that
  abort UPDATE and DELETE. (Anyone with raw write access to the file can drop
  them; that is what the hash chain and checkpoints are for.)

The table is declared on its own ``MetaData`` so the audit schema and its
Alembic history stay separate from the gateway's tables in the same database.
If you change this file, add a migration under ``audit/migrations/versions``;
``tests/test_audit_store.py`` checks that the two agree.
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
