"""A new entry kind, ``delivered``: what a checked stream's client received, when its terminal entry cannot say.

Revision ID: audit_0007
Revises: audit_0006
Create Date: 2026-12-05

A stream under output rules whose Redis dies mid-text is recorded ``failed``
by its worker (the worker's next piece meets no Redis), with what it
generated as ``output`` and no ``client_output``: only the gateway knows what
it judged and released, and the worker's entry, written first, is the
request's one terminal entry. The gateway now appends a ``delivered`` entry
beside it (audit.kinds.DELIVERED), so the kind's CHECK constraint lists one
kind more. Nothing else changes: no row is rewritten and no index touched.

PostgreSQL: the constraint is dropped and made again under the appenders'
advisory lock, then validated (one scan; every stored row passes, the list
only grew). SQLite cannot alter a constraint, and a rebuild (audit_0005) costs
about 97 s a million entries for a change that loosens a CHECK; SQLite's own
procedure for that (https://sqlite.org/lang_altertable.html, "Making Other
Kinds Of Table Schema Changes": the table's SQL edited in ``sqlite_schema``
with ``writable_schema``, the schema version stepped so every connection
prepares its statements again) is used instead: instant, and ``PRAGMA
quick_check`` run after it. The edit must find the old list exactly once
in the table's SQL, or the migration stops and changes nothing.

The downgrade puts the old list back; it refuses, changing nothing, while a
``delivered`` entry is stored (an append-only log keeps it).
Frozen copy: no imports from ``audit.tables``.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "audit_0007"
down_revision: Union[str, Sequence[str], None] = "audit_0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_BEFORE = (
    "('cancelled', 'chain_anomaly', 'chain_format', 'commented', 'completion', 'dispositioned', 'failed',"
    " 'flagged', 'key_created', 'key_revoked', 'key_roles_changed', 'payload_read', 'payloads_erased',"
    " 'rejected', 'request', 'timed_out')"
)
_AFTER = (
    "('cancelled', 'chain_anomaly', 'chain_format', 'commented', 'completion', 'delivered', 'dispositioned',"
    " 'failed', 'flagged', 'key_created', 'key_revoked', 'key_roles_changed', 'payload_read',"
    " 'payloads_erased', 'rejected', 'request', 'timed_out')"
)
#: The CHECK's name since audit_0001 (the naming convention prefixed it once more).
_KIND_CHECK = "ck_audit_entries_ck_audit_entries_kind"
#: audit.db.APPEND_LOCK_KEY at this revision (PostgreSQL advisory lock of the appenders).
_APPEND_LOCK_KEY = 0x60_6A_7E_A0_D1_70_00_01


def upgrade() -> None:
    _kinds(_BEFORE, _AFTER)


def downgrade() -> None:
    stored = op.get_bind().execute(sa.text("SELECT count(*) FROM audit_entries WHERE kind = 'delivered'")).scalar()
    if stored:
        raise RuntimeError(f"audit_0007 cannot be downgraded: {stored} 'delivered' entries are stored, and the "
                           "log is append-only")
    _kinds(_AFTER, _BEFORE)


def _kinds(old: str, new: str) -> None:
    """The kind CHECK's list made ``new`` (it was ``old``)."""
    if op.get_context().as_sql:
        raise RuntimeError("audit_0007 must run online: it reads the table's definition")
    if op.get_context().dialect.name == "postgresql":
        # Before any ALTER: an appender holding this lock and waiting for the table would deadlock us.
        op.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
        op.execute(f"ALTER TABLE audit_entries DROP CONSTRAINT {_KIND_CHECK}")
        op.execute(f"ALTER TABLE audit_entries ADD CONSTRAINT {_KIND_CHECK} CHECK (kind IN {new}) NOT VALID")
        op.execute(f"ALTER TABLE audit_entries VALIDATE CONSTRAINT {_KIND_CHECK}")
        return
    _edit_sqlite_check(old, new)


def _edit_sqlite_check(old: str, new: str) -> None:
    bind = op.get_bind()
    table_sql = bind.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_entries'")
                             ).scalar()
    wanted = f"CONSTRAINT {_KIND_CHECK} CHECK (kind IN {old})"
    if table_sql is None or table_sql.count(wanted) != 1:
        raise RuntimeError("audit_0007: the audit_entries table's SQL does not hold its kind CHECK as audit_0005 "
                           "made it; nothing was changed")
    version = bind.execute(sa.text("PRAGMA schema_version")).scalar()
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    try:
        bind.execute(sa.text("UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = 'audit_entries'"),
                     {"sql": table_sql.replace(wanted, f"CONSTRAINT {_KIND_CHECK} CHECK (kind IN {new})")})
        bind.execute(sa.text(f"PRAGMA schema_version = {int(version) + 1}"))
    finally:
        bind.execute(sa.text("PRAGMA writable_schema = OFF"))
    problems = [row[0] for row in bind.execute(sa.text("PRAGMA quick_check"))]
    if problems != ["ok"]:
        raise RuntimeError(f"audit_0007: PRAGMA quick_check after the edit: {'; '.join(problems)}")
