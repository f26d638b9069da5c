"""Create audit_entries with its chain, terminal and append-only guarantees.

Revision ID: audit_0001
Revises:
Create Date: 2025-11-26

Frozen copy of the schema at this revision (no imports from audit.tables, so
later model changes cannot rewrite history).
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "audit_0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TERMINAL = "('cancelled', 'completion', 'failed', 'timed_out')"
_KINDS = "('cancelled', 'completion', 'failed', 'rejected', 'request', 'timed_out')"
_REFUSAL = "audit entries are append-only"


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(255), nullable=True),
        sa.Column("team", sa.String(255), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("policy_revision", sa.String(255), nullable=True),
        sa.Column("terminal_request_id", sa.String(255), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_entries"),
        sa.CheckConstraint(f"kind IN {_KINDS}", name="ck_audit_entries_kind"),
        sa.CheckConstraint(
            f"(kind IN {_TERMINAL}"
            " AND terminal_request_id IS NOT NULL AND terminal_request_id = request_id)"
            f" OR (kind NOT IN {_TERMINAL} AND terminal_request_id IS NULL)",
            name="ck_audit_entries_terminal",
        ),
        sa.UniqueConstraint("terminal_request_id", name="uq_audit_entries_terminal_request_id"),
        sa.UniqueConstraint("prev_hash", name="uq_audit_entries_prev_hash"),
    )
    op.create_index("ix_audit_entries_request_id", "audit_entries", ["request_id"])
    op.create_index("ix_audit_entries_created_at", "audit_entries", ["created_at"])
    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_index("ix_audit_entries_created_at", table_name="audit_entries")
    op.drop_index("ix_audit_entries_request_id", table_name="audit_entries")
    op.drop_table("audit_entries")


def _dialect() -> str:
    # get_context() works offline (--sql) too, unlike get_bind().
    return op.get_context().dialect.name


def _create_append_only_triggers() -> None:
    if _dialect() == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_entries_no_{event.lower()} BEFORE {event} ON audit_entries"
                f" BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
            )
    elif _dialect() == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_entries_no_change BEFORE UPDATE OR DELETE ON audit_entries"
            " FOR EACH ROW EXECUTE FUNCTION audit_entries_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit_entries_append_only()"
        )


def _drop_append_only_triggers() -> None:
    if _dialect() == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_entries_no_delete")
    elif _dialect() == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_entries_no_truncate ON audit_entries")
        op.execute("DROP TRIGGER IF EXISTS audit_entries_no_change ON audit_entries")
        op.execute("DROP FUNCTION IF EXISTS audit_entries_append_only()")
