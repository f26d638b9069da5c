"""The audit tables: one row per entry, append-only, hash-chained; and the signed checkpoints.

The schema itself enforces the chain's rules (one entry per ``seq``, one terminal entry
per request, no UPDATE but a payload's erasure, no DELETE, no INSERT OR
REPLACE over an entry; the triggers are made by the migrations); see
docs/architecture.md, "Audit entries and the chain". A change here needs a migration under
``audit/migrations/versions``; ``tests/audit/test_audit_store.py`` checks they agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, CheckConstraint, Column, Index, Integer, MetaData, String, text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from .entry_args import NAME_LEN
from .kinds import KINDS, TERMINAL_KINDS, sql_in_list
from .sqltypes import UTCDateTime

TABLE_NAME = "audit_entries"
CHECKPOINT_TABLE_NAME = "audit_checkpoints"
TIME_ORDER_TABLE_NAME = "audit_time_order"
CLOSING_MARK_TABLE_NAME = "audit_closing_marks"


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
        # The review API's searches filter on one of these and page on seq (audit_0003).
        *(Index(f"ix_audit_entries_{column}_seq", column, "seq") for column in ("principal", "team", "model", "kind")),
        # Within a time range they page on the same indexes: the range is turned into a seq range
        # (audit.time_order), so no (column, created_at) index is kept (audit_0004 made them, audit_0005
        # dropped them: a third of an append's SQLite work).
        # One terminal entry per request; partial, so the entries without one never touch it (audit_0005).
        Index("uq_audit_entries_terminal_request_id", "terminal_request_id", unique=True,
              sqlite_where=text("terminal_request_id IS NOT NULL"),
              postgresql_where=text("terminal_request_id IS NOT NULL")),
    )

    seq: int = Field(sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    request_id: str = Field(sa_column=Column(String(NAME_LEN), nullable=False, index=True))
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    principal: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    team: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    model: str | None = Field(default=None, sa_column=Column(String(NAME_LEN), nullable=True))
    body: dict[str, Any] = Field(sa_column=Column(JSON(), nullable=False))
    policy_revision: str | None = Field(
        default=None, sa_column=Column(String(NAME_LEN), nullable=True)
    )
    terminal_request_id: str | None = Field(
        default=None, sa_column=Column(String(NAME_LEN), nullable=True)
    )
    #: Not unique in the schema: the append takes it and ``seq`` (the primary key) from one head row,
    #: so a fork collides on ``seq``; a row forged around the store fails ``verify`` (audit_0005).
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    #: The erasable texts (prompt/messages as ``prompt_logging`` allows, output), canonical JSON
    #: with a random ``salt``; NULL when the entry has none or once erased. JSON, never JSONB on
    #: PostgreSQL: the stored text must stay byte for byte what was digested. ``none_as_null``: None
    #: is SQL NULL (what erasure writes and the guards expect), not the JSON text ``null``.
    payload: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True), nullable=True))
    #: Hex SHA-256 of the stored payload text; the format-2 hash covers this, and it stays after erasure.
    payload_digest: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class AuditCheckpointRow(AuditModel, table=True):
    """A signed checkpoint of the chain head (written by :mod:`audit.checkpoints`); append-only."""

    __tablename__ = CHECKPOINT_TABLE_NAME

    #: The entry whose hash is ``head_hash``.
    seq: int = Field(sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=False))
    head_hash: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    #: Hex SHA-256 of the raw 32-byte Ed25519 public key.
    key_id: str = Field(sa_column=Column(String(64), nullable=False))
    #: Hex Ed25519 signature.
    signature: str = Field(sa_column=Column(String(128), nullable=False))
    #: Written at a clean shutdown.
    closing: bool = Field(sa_column=Column(Boolean(), nullable=False))


class AuditClosingMarkRow(AuditModel, table=True):
    """A closing checkpoint of a head that a checkpoint signed already (written by :mod:`audit.checkpoints`).

    A gateway's stop signs the head as a closing checkpoint, but one checkpoint per entry: an idle gateway's
    head was signed by its last tick, and its stop left no closing one (the usual case). What "closing"
    gives was lost then: entries after it are known to be written while no gateway ran, and an operator's
    command then signs its own entry (``govgate/own_entries.py``). The mark is that closing checkpoint,
    kept beside the plain one: the same signed fields (``closing`` true), one per entry, append-only.
    """

    __tablename__ = CLOSING_MARK_TABLE_NAME

    seq: int = Field(sa_column=Column(_SEQ_TYPE, primary_key=True, autoincrement=False))
    head_hash: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    key_id: str = Field(sa_column=Column(String(64), nullable=False))
    signature: str = Field(sa_column=Column(String(128), nullable=False))


class AuditTimeOrderRow(AuditModel, table=True):
    """From which ``seq`` on ``created_at`` never goes back along the chain; one row (id 1), made by audit_0005.

    The append keeps ``created_at`` non-decreasing (:mod:`audit.appender`);
    entries written before audit_0005 may not be, so the migration recorded
    where the ordered stretch begins and the latest time before it. A search
    uses it to turn a time range into a ``seq`` range (:mod:`audit.time_order`).
    """

    __tablename__ = TIME_ORDER_TABLE_NAME

    id: int = Field(sa_column=Column(Integer(), primary_key=True, autoincrement=False))
    #: The first seq of the stretch in which ``created_at`` never decreases (1: the whole chain).
    ordered_from: int = Field(sa_column=Column(BigInteger(), nullable=False))
    #: The latest ``created_at`` before ``ordered_from`` (None when that is 1).
    earlier_latest: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


audit_table = AuditEntryRow.__table__
time_order_table = AuditTimeOrderRow.__table__
checkpoint_table = AuditCheckpointRow.__table__
closing_mark_table = AuditClosingMarkRow.__table__
