"""Indexes for a search by principal, team or model within a time range: each column with created_at.

Revision ID: audit_0004
Revises: audit_0003
Create Date: 2026-11-30

A search pages on ``seq`` and first picks a page's seqs from an index
(:func:`audit.search.search`). With ``(team, seq)`` alone, "this team,
last Tuesday" walked the team's entries from the newest, reading each row
to test its time, until it had a page: on a million entries a day a month
back cost hundreds of milliseconds (bench/audit.py). On
``(column, created_at)`` the range is one index range whose entries carry
the seq (the rowid on SQLite; PostgreSQL reads the seq from the row), so the
page costs that team's entries of that day, not the whole log. Frozen
copy: no imports from ``audit.tables``.
"""

from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "audit_0004"
down_revision: Union[str, Sequence[str], None] = "audit_0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_INDEXED = ("principal", "team", "model")


def upgrade() -> None:
    for column in _INDEXED:
        op.create_index(f"ix_audit_entries_{column}_created_at", "audit_entries", [column, "created_at"])


def downgrade() -> None:
    for column in _INDEXED:
        op.drop_index(f"ix_audit_entries_{column}_created_at", table_name="audit_entries")
