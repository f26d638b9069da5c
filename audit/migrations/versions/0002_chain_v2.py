"""Chain format 2: erasable payloads, checkpoints, new kinds, guards against INSERT OR REPLACE.

Revision ID: audit_0002
Revises: audit_0001
Create Date: 2026-11-30

Frozen copy of the schema at this revision (no imports from audit.tables
or audit.chain, so later changes cannot rewrite history). What changes:

- ``kind`` widened to 32 characters; its CHECK lists the new kinds.
- ``payload`` (JSON, NULL): the erasable texts of an entry; ``payload_digest``
  (hex SHA-256 of the stored payload text): what the format-2 hash covers.
- ``audit_checkpoints``: signed checkpoints of the chain head, append-only.
- Guards: an insert whose ``seq``, ``prev_hash`` or ``terminal_request_id``
  already exists is refused by a trigger *before* SQLite's ``INSERT OR
  REPLACE`` / UPSERT could delete the old row (the DELETE trigger does not
  fire for REPLACE deletions); UPDATE is refused except ``payload -> NULL``
  with every other column unchanged (the erasure of ``govgate audit prune``).

SQLite cannot alter a CHECK constraint, so ``audit_entries`` is rebuilt:
new table, rows copied value for value (the stored body text is not touched,
so the chain keeps verifying), old table dropped, new one renamed, indexes
and triggers made again, all in the migration's transaction.

The format boundary: when the table already holds entries, this migration
appends the ``chain_format`` entry ``{"format": 2}`` (hashed in format 1,
like every entry before it) in the same transaction, so no moment exists in
which the schema is new and the chain's format ambiguous. On an empty store
the store's first append writes it (audit/appender.py). Processes running
the old code must be stopped before the upgrade: an old-format entry after
the boundary does not verify.

There is no downgrade: entries after the boundary are format 2 and the
chain is append-only.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "audit_0002"
down_revision: Union[str, Sequence[str], None] = "audit_0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TERMINAL = "('cancelled', 'completion', 'failed', 'timed_out')"
_KINDS = (
    "('cancelled', 'chain_anomaly', 'chain_format', 'commented', 'completion', 'dispositioned', 'failed',"
    " 'flagged', 'key_created', 'key_revoked', 'key_roles_changed', 'payload_read', 'payloads_erased',"
    " 'rejected', 'request', 'timed_out')"
)
_REFUSAL = "audit entries are append-only"
#: The CHECK names audit_0001 actually made (the naming convention prefixed its explicit names once more).
_KIND_CHECK = "ck_audit_entries_ck_audit_entries_kind"
_TERMINAL_CHECK = "ck_audit_entries_ck_audit_entries_terminal"
_CHECKPOINT_REFUSAL = "audit checkpoints are append-only"
#: audit.db.APPEND_LOCK_KEY at this revision (PostgreSQL advisory lock of the appenders).
_APPEND_LOCK_KEY = 0x60_6A_7E_A0_D1_70_00_01

#: Every column of audit_entries at this revision, in table order.
_COLUMNS = (
    "seq", "created_at", "request_id", "kind", "principal", "team", "model", "body", "policy_revision",
    "terminal_request_id", "prev_hash", "hash", "payload", "payload_digest",
)
_OLD_COLUMNS = _COLUMNS[:-2]
#: Columns an UPDATE may not change (only ``payload`` may go to NULL).
_FIXED = tuple(c for c in _COLUMNS if c != "payload")

BOUNDARY_REQUEST_ID = "chain-format-2"


def _entries_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("principal", sa.String(255), nullable=True),
        sa.Column("team", sa.String(255), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("policy_revision", sa.String(255), nullable=True),
        sa.Column("terminal_request_id", sa.String(255), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("payload_digest", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_entries"),
        sa.CheckConstraint(f"kind IN {_KINDS}", name=op.f(_KIND_CHECK)),
        sa.CheckConstraint(
            f"(kind IN {_TERMINAL}"
            " AND terminal_request_id IS NOT NULL AND terminal_request_id = request_id)"
            f" OR (kind NOT IN {_TERMINAL} AND terminal_request_id IS NULL)",
            name=op.f(_TERMINAL_CHECK),
        ),
        sa.UniqueConstraint("terminal_request_id", name="uq_audit_entries_terminal_request_id"),
        sa.UniqueConstraint("prev_hash", name="uq_audit_entries_prev_hash"),
    )


def upgrade() -> None:
    dialect = _dialect()
    if dialect == "postgresql":
        # Before any ALTER: an appender holding this lock and waiting for the table would deadlock us.
        op.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
        _upgrade_postgresql()
    else:
        _upgrade_sqlite()
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("closing", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_checkpoints"),
    )
    _checkpoint_guards(dialect)
    _append_boundary(dialect)


def downgrade() -> None:
    raise NotImplementedError(
        "audit_0002 cannot be downgraded: entries after the chain_format boundary are format 2, "
        "and the chain is append-only")


def _dialect() -> str:
    return op.get_context().dialect.name


# -- SQLite --------------------------------------------------------------------


def _upgrade_sqlite() -> None:
    _entries_table("audit_entries_v2")
    columns = ", ".join(_OLD_COLUMNS)
    op.execute(f"INSERT INTO audit_entries_v2 ({columns}) SELECT {columns} FROM audit_entries")
    # DROP TABLE drops the old indexes and triggers with it and fires no DELETE trigger.
    op.execute("DROP TABLE audit_entries")
    op.execute("ALTER TABLE audit_entries_v2 RENAME TO audit_entries")
    op.create_index("ix_audit_entries_request_id", "audit_entries", ["request_id"])
    op.create_index("ix_audit_entries_created_at", "audit_entries", ["created_at"])
    unchanged = " AND ".join(f"NEW.{c} IS OLD.{c}" for c in _FIXED)
    op.execute(
        "CREATE TRIGGER audit_entries_no_update BEFORE UPDATE ON audit_entries"
        f" WHEN NOT (NEW.payload IS NULL AND {unchanged})"
        f" BEGIN SELECT RAISE(ABORT, '{_REFUSAL} (only a payload may be erased)'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_entries_no_delete BEFORE DELETE ON audit_entries"
        f" BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
    )
    # One indexed look-up per unique column; an OR in one WHERE could make SQLite scan the table.
    op.execute(
        "CREATE TRIGGER audit_entries_no_replace BEFORE INSERT ON audit_entries BEGIN"
        " SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.seq (" + _REFUSAL + ")')"
        "  WHERE EXISTS (SELECT 1 FROM audit_entries WHERE seq = NEW.seq);"
        " SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.prev_hash (" + _REFUSAL + ")')"
        "  WHERE EXISTS (SELECT 1 FROM audit_entries WHERE prev_hash = NEW.prev_hash);"
        " SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.terminal_request_id (" + _REFUSAL + ")')"
        "  WHERE NEW.terminal_request_id IS NOT NULL"
        "  AND EXISTS (SELECT 1 FROM audit_entries WHERE terminal_request_id = NEW.terminal_request_id);"
        " END"
    )


# -- PostgreSQL ----------------------------------------------------------------


def _upgrade_postgresql() -> None:
    op.execute("ALTER TABLE audit_entries ALTER COLUMN kind TYPE VARCHAR(32)")
    op.execute(f"ALTER TABLE audit_entries DROP CONSTRAINT {_KIND_CHECK}")
    op.execute(f"ALTER TABLE audit_entries ADD CONSTRAINT {_KIND_CHECK} CHECK (kind IN {_KINDS})")
    # JSON, never JSONB: JSON keeps the text byte for byte, which the digest covers.
    op.add_column("audit_entries", sa.Column("payload", sa.JSON(), nullable=True))
    op.add_column("audit_entries", sa.Column("payload_digest", sa.String(64), nullable=True))
    # json has no equality operator; its text is what was stored, so compare that.
    old = ", ".join(f"OLD.{c}::text" if c == "body" else f"OLD.{c}" for c in _FIXED)
    new = ", ".join(f"NEW.{c}::text" if c == "body" else f"NEW.{c}" for c in _FIXED)
    op.execute("DROP TRIGGER IF EXISTS audit_entries_no_change ON audit_entries")
    op.execute(
        "CREATE FUNCTION audit_entries_erase_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF NEW.payload IS NULL AND ({new}) IS NOT DISTINCT FROM ({old}) THEN RETURN NEW; END IF;"
        f" RAISE EXCEPTION '{_REFUSAL} (only a payload may be erased)'; END $$"
    )
    op.execute(
        "CREATE TRIGGER audit_entries_no_update BEFORE UPDATE ON audit_entries"
        " FOR EACH ROW EXECUTE FUNCTION audit_entries_erase_only()"
    )
    # INSERT ... ON CONFLICT DO UPDATE goes through the UPDATE trigger above; plain conflicts hit the
    # unique constraints. DELETE and TRUNCATE keep audit_0001's function.
    op.execute(
        "CREATE TRIGGER audit_entries_no_delete BEFORE DELETE ON audit_entries"
        " FOR EACH ROW EXECUTE FUNCTION audit_entries_append_only()"
    )


# -- checkpoints ---------------------------------------------------------------


def _checkpoint_guards(dialect: str) -> None:
    if dialect == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_checkpoints_no_{event.lower()} BEFORE {event} ON audit_checkpoints"
                f" BEGIN SELECT RAISE(ABORT, '{_CHECKPOINT_REFUSAL}'); END"
            )
        op.execute(
            "CREATE TRIGGER audit_checkpoints_no_replace BEFORE INSERT ON audit_checkpoints BEGIN"
            " SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_checkpoints.seq (" + _CHECKPOINT_REFUSAL + ")')"
            "  WHERE EXISTS (SELECT 1 FROM audit_checkpoints WHERE seq = NEW.seq); END"
        )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{_CHECKPOINT_REFUSAL}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON audit_checkpoints"
            " FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only()"
        )


# -- the format boundary ---------------------------------------------------------


def _canonical(value: object) -> bytes:
    """Canonical JSON as audit.chain wrote it at this revision (format 1)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _append_boundary(dialect: str) -> None:
    """Append ``chain_format {"format": 2}`` when entries exist; an empty store gets it at its first append."""
    if op.get_context().as_sql:
        raise RuntimeError("audit_0002 must run online: it appends the chain_format entry after the head")
    bind = op.get_bind()
    head = bind.execute(sa.text("SELECT seq, hash FROM audit_entries ORDER BY seq DESC LIMIT 1")).first()
    if head is None:
        return
    now = datetime.now(timezone.utc)
    body = {"format": 2}
    fields = {
        "seq": head[0] + 1,
        "created_at": now.isoformat(timespec="microseconds"),
        "request_id": BOUNDARY_REQUEST_ID,
        "kind": "chain_format",
        "principal": None,
        "team": None,
        "model": None,
        "body": body,
        "policy_revision": None,
        "terminal_request_id": None,
        "prev_hash": head[1],
    }
    digest = hashlib.sha256(head[1].encode("ascii"))
    digest.update(_canonical(fields))
    values = {**fields, "body": _canonical(body).decode("utf-8"), "hash": digest.hexdigest()}
    if dialect == "sqlite":
        values["created_at"] = now.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        body_sql = ":body"
    else:
        values["created_at"] = now
        body_sql = "CAST(:body AS JSON)"
    bind.execute(
        sa.text(
            "INSERT INTO audit_entries (seq, created_at, request_id, kind, principal, team, model, body,"
            " policy_revision, terminal_request_id, prev_hash, hash)"
            f" VALUES (:seq, :created_at, :request_id, :kind, :principal, :team, :model, {body_sql},"
            " :policy_revision, :terminal_request_id, :prev_hash, :hash)"
        ),
        values,
    )
