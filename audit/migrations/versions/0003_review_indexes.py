"""Indexes for the review API's searches: principal, team, model and kind, each with seq.

Revision ID: audit_0003
Revises: audit_0002
Create Date: 2026-11-30

A review search filters on one of these columns and pages on ``seq``
(newest first by default): an index on ``(column, seq)`` hands the rows out
already in page order, so a page costs its own rows however many entries
match, on SQLite and on PostgreSQL alike. ``created_at`` (time ranges) and
``request_id`` (a request's story) were indexed already. Frozen copy: no
imports from ``audit.tables``.
"""

from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "audit_0003"
down_revision: Union[str, Sequence[str], None] = "audit_0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_INDEXED = ("principal", "team", "model", "kind")


def upgrade() -> None:
    for column in _INDEXED:
        op.create_index(f"ix_audit_entries_{column}_seq", "audit_entries", [column, "seq"])


def downgrade() -> None:
    for column in _INDEXED:
        op.drop_index(f"ix_audit_entries_{column}_seq", table_name="audit_entries")
