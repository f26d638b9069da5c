"""Closing marks: a gateway's closing checkpoint of a head that a checkpoint signed already.

Revision ID: audit_0006
Revises: audit_0005
Create Date: 2026-12-04

A stopping gateway signs the chain's head as a closing checkpoint, and
``audit_checkpoints`` holds one checkpoint per entry. An idle gateway's head
was signed by its last tick, so its stop wrote none, and the chain lost what
"closing" says: entries after it were written while no gateway ran (the
next start names them at once), and an operator's command run then signs
its own entry (``govgate/own_entries.py``) instead of leaving it for the next
start to record as a ``chain_anomaly``. ``audit_closing_marks`` keeps that
closing checkpoint beside the plain one: the same columns but ``closing``
(always true, and signed so), one per entry, append-only like the
checkpoints. A new table only: no lock on the entries, nothing rewritten.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "audit_0006"
down_revision: Union[str, Sequence[str], None] = "audit_0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TABLE = "audit_closing_marks"
_REFUSAL = "audit closing marks are append-only"


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=f"pk_{_TABLE}"),
    )
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER {_TABLE}_no_{event.lower()} BEFORE {event} ON {_TABLE}"
                       f" BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END")
        # INSERT OR REPLACE would delete the row it replaces without firing the DELETE trigger
        op.execute(f"CREATE TRIGGER {_TABLE}_no_replace BEFORE INSERT ON {_TABLE} BEGIN"
                   f" SELECT RAISE(ABORT, 'UNIQUE constraint failed: {_TABLE}.seq ({_REFUSAL})')"
                   f"  WHERE EXISTS (SELECT 1 FROM {_TABLE} WHERE seq = NEW.seq); END")
    elif dialect == "postgresql":
        op.execute(f"CREATE FUNCTION {_TABLE}_append_only() RETURNS trigger LANGUAGE plpgsql AS"
                   f" $$ BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $$")
        op.execute(f"CREATE TRIGGER {_TABLE}_no_change BEFORE UPDATE OR DELETE ON {_TABLE}"
                   f" FOR EACH ROW EXECUTE FUNCTION {_TABLE}_append_only()")
        op.execute(f"CREATE TRIGGER {_TABLE}_no_truncate BEFORE TRUNCATE ON {_TABLE}"
                   f" FOR EACH STATEMENT EXECUTE FUNCTION {_TABLE}_append_only()")


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    op.drop_table(_TABLE)  # its triggers go with it
    if dialect == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_TABLE}_append_only()")
