"""A leaner append: fewer index pages per commit, a cheaper INSERT OR REPLACE guard, time ranges as seq ranges.

Revision ID: audit_0005
Revises: audit_0004
Create Date: 2026-11-30

An append's commit writes one WAL page per index leaf it touches, and an
index on a random-looking key (a hash, a request id) touches a different
leaf each time. Measured with bench/audit_sqlite_floor.py (docs/architecture.md,
"audit: the append path"), these did not earn their cost:

- ``UNIQUE (terminal_request_id)`` held a NULL for every non-terminal entry
  (about half of them). A partial unique index ``WHERE terminal_request_id
  IS NOT NULL`` gives the same guarantee (one terminal entry per request),
  and the entries without one no longer touch it.
- ``UNIQUE (prev_hash)`` guarded against a fork: two entries naming the same
  predecessor. Every append takes ``seq`` and ``prev_hash`` from the same
  head row inside the write lock, so a writer with a stale head (a second
  process, a stale snapshot) collides on ``seq``, the primary key, first;
  what the index alone refused was a row written around the store at
  another ``seq``, which ``verify`` reports (its ``prev_hash`` is not its
  predecessor's hash) like any other forged row. Dropped on both backends.
- The three ``(principal|team|model, created_at)`` indexes (audit_0004), about
  a third of an append's SQLite work. The append now keeps ``created_at``
  non-decreasing along the chain, so a search turns a time range into a
  ``seq`` range and pages on the ``(column, seq)`` indexes
  (:mod:`audit.time_order`). Entries already stored may go back in time (a
  clock stepped back): ``audit_time_order`` records the first ``seq`` from
  which they never do (found here in one pass over the table) and the
  latest time before it; a range that reaches back there is searched on
  ``created_at`` as before. Processes running earlier code must be stopped
  before the upgrade (as for audit_0002): their appends do not keep the order.
- The INSERT OR REPLACE guard's look-ups move into the trigger's WHEN, so an
  ordinary insert runs one expression instead of two statements; the
  statements that name the refused key run only when one is refused.

SQLite cannot drop a table's inline UNIQUE constraint, so ``audit_entries``
is rebuilt as audit_0002 did it: new table, rows copied value for value
(stored bytes untouched, the chain keeps verifying), old table dropped
(DROP TABLE fires no DELETE trigger), new one renamed, indexes and guards
made again, in the migration's transaction (97 s for a million entries on
the 2-core machine; the old table's pages stay as free pages). The INSERT OR REPLACE guard
(``audit_entries_no_replace``) keeps its look-ups for the unique keys left,
``seq`` and ``terminal_request_id``: with no unique ``prev_hash`` a REPLACE
has no third key to delete a row by. On PostgreSQL the constraints are
dropped and the partial index made, under the appenders' advisory lock.

The downgrade rebuilds (SQLite) or re-adds (PostgreSQL) both unique
constraints and the three indexes, and drops ``audit_time_order``; it
fails, changing nothing, if entries written since share a ``prev_hash``.
Frozen copy: no imports from ``audit.tables``.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "audit_0005"
down_revision: Union[str, Sequence[str], None] = "audit_0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TERMINAL = "('cancelled', 'completion', 'failed', 'timed_out')"
_KINDS = (
    "('cancelled', 'chain_anomaly', 'chain_format', 'commented', 'completion', 'dispositioned', 'failed',"
    " 'flagged', 'key_created', 'key_revoked', 'key_roles_changed', 'payload_read', 'payloads_erased',"
    " 'rejected', 'request', 'timed_out')"
)
_REFUSAL = "audit entries are append-only"
#: The CHECK names the table has had since audit_0001 (the naming convention prefixed them once more).
_KIND_CHECK = "ck_audit_entries_ck_audit_entries_kind"
_TERMINAL_CHECK = "ck_audit_entries_ck_audit_entries_terminal"
_TERMINAL_UNIQUE = "uq_audit_entries_terminal_request_id"
_PREV_HASH_UNIQUE = "uq_audit_entries_prev_hash"
#: audit.db.APPEND_LOCK_KEY at this revision (PostgreSQL advisory lock of the appenders).
_APPEND_LOCK_KEY = 0x60_6A_7E_A0_D1_70_00_01

_COLUMNS = (
    "seq", "created_at", "request_id", "kind", "principal", "team", "model", "body", "policy_revision",
    "terminal_request_id", "prev_hash", "hash", "payload", "payload_digest",
)
#: Columns an UPDATE may not change (only ``payload`` may go to NULL).
_FIXED = tuple(c for c in _COLUMNS if c != "payload")
#: The plain indexes kept, (name, columns); the SQLite rebuild makes them again.
_INDEXES = (
    ("ix_audit_entries_request_id", ["request_id"]),
    ("ix_audit_entries_created_at", ["created_at"]),
    *((f"ix_audit_entries_{c}_seq", [c, "seq"]) for c in ("principal", "team", "model", "kind")),
)
#: audit_0004's indexes, dropped here.
_TIME_INDEXES = tuple((f"ix_audit_entries_{c}_created_at", [c, "created_at"]) for c in ("principal", "team", "model"))
_TIME_ORDER = "audit_time_order"

_SEQ_GUARD = (" SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.seq (" + _REFUSAL + ")')"
              "  WHERE EXISTS (SELECT 1 FROM audit_entries WHERE seq = NEW.seq);")
_PREV_HASH_GUARD = (" SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.prev_hash (" + _REFUSAL + ")')"
                    "  WHERE EXISTS (SELECT 1 FROM audit_entries WHERE prev_hash = NEW.prev_hash);")
# ``terminal_request_id = NEW...`` implies IS NOT NULL, so SQLite looks it up in the partial index.
_TERMINAL_GUARD = (" SELECT RAISE(ABORT, 'UNIQUE constraint failed: audit_entries.terminal_request_id ("
                   + _REFUSAL + ")')"
                   "  WHERE NEW.terminal_request_id IS NOT NULL"
                   "  AND EXISTS (SELECT 1 FROM audit_entries WHERE terminal_request_id = NEW.terminal_request_id);")


def upgrade() -> None:
    if op.get_context().as_sql:
        raise RuntimeError("audit_0005 must run online: it reads the stored times to record their order")
    if _dialect() == "postgresql":
        # Before any ALTER: an appender holding this lock and waiting for the table would deadlock us.
        op.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
        op.drop_constraint(_PREV_HASH_UNIQUE, "audit_entries", type_="unique")
        op.drop_constraint(_TERMINAL_UNIQUE, "audit_entries", type_="unique")
        for name, _ in _TIME_INDEXES:
            op.drop_index(name, table_name="audit_entries")
        _partial_terminal_index()
    else:
        _rebuild_sqlite(lean=True)
    _record_time_order()


def downgrade() -> None:
    op.drop_table(_TIME_ORDER)
    if _dialect() == "postgresql":
        op.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
        op.drop_index(_TERMINAL_UNIQUE, table_name="audit_entries")
        op.create_unique_constraint(_TERMINAL_UNIQUE, "audit_entries", ["terminal_request_id"])
        op.create_unique_constraint(_PREV_HASH_UNIQUE, "audit_entries", ["prev_hash"])
        for name, indexed in _TIME_INDEXES:
            op.create_index(name, "audit_entries", indexed)
    else:
        _rebuild_sqlite(lean=False)


def _record_time_order() -> None:
    """``audit_time_order``: the first seq from which ``created_at`` never decreases, and the latest time before.

    One pass in seq order: the last entry older than its predecessor starts
    the ordered stretch (none: the whole chain is ordered, ``ordered_from``
    1). SQLite compares the stored texts, whose fixed form sorts as time.
    """
    op.create_table(
        _TIME_ORDER,
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ordered_from", sa.BigInteger(), nullable=False),
        sa.Column("earlier_latest", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{_TIME_ORDER}"),
    )
    bind = op.get_bind()
    last_step_back = bind.execute(sa.text(
        "SELECT max(seq) FROM (SELECT seq, created_at < lag(created_at) OVER (ORDER BY seq) AS back"
        " FROM audit_entries) AS steps WHERE back")).scalar()
    ordered_from = last_step_back if last_step_back is not None else 1
    # The stored value as is (text on SQLite, timestamptz on PostgreSQL), so no conversion can shift it.
    bind.execute(sa.text(
        f"INSERT INTO {_TIME_ORDER} (id, ordered_from, earlier_latest)"
        " SELECT 1, :ordered_from, (SELECT max(created_at) FROM audit_entries WHERE seq < :ordered_from)"),
        {"ordered_from": ordered_from})


def _dialect() -> str:
    return op.get_context().dialect.name


def _partial_terminal_index() -> None:
    op.create_index(_TERMINAL_UNIQUE, "audit_entries", ["terminal_request_id"], unique=True,
                    sqlite_where=sa.text("terminal_request_id IS NOT NULL"),
                    postgresql_where=sa.text("terminal_request_id IS NOT NULL"))


def _rebuild_sqlite(*, lean: bool) -> None:
    """``audit_entries`` made again with (``lean``) or without audit_0005's changes, every row copied as stored."""
    uniques = [] if lean else [sa.UniqueConstraint("terminal_request_id", name=_TERMINAL_UNIQUE),
                               sa.UniqueConstraint("prev_hash", name=_PREV_HASH_UNIQUE)]
    op.create_table(
        "audit_entries_new",
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
        *uniques,
    )
    columns = ", ".join(_COLUMNS)
    op.execute(f"INSERT INTO audit_entries_new ({columns}) SELECT {columns} FROM audit_entries ORDER BY seq")
    # DROP TABLE drops the old indexes and triggers with it and fires no DELETE trigger.
    op.execute("DROP TABLE audit_entries")
    op.execute("ALTER TABLE audit_entries_new RENAME TO audit_entries")
    for name, indexed in _INDEXES + (() if lean else _TIME_INDEXES):
        op.create_index(name, "audit_entries", indexed)
    if lean:
        _partial_terminal_index()
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
    # Refused *before* SQLite's INSERT OR REPLACE / UPSERT could delete the row holding a unique key (the
    # DELETE trigger does not fire for REPLACE deletions): one indexed look-up per unique key.
    if lean:
        # The look-ups in the WHEN: an insert that takes no existing key runs that one expression; the
        # body, whose statements name the key refused, runs only for one that does.
        op.execute(
            "CREATE TRIGGER audit_entries_no_replace BEFORE INSERT ON audit_entries"
            " WHEN EXISTS (SELECT 1 FROM audit_entries WHERE seq = NEW.seq)"
            " OR (NEW.terminal_request_id IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM audit_entries WHERE terminal_request_id = NEW.terminal_request_id))"
            f" BEGIN{_SEQ_GUARD}{_TERMINAL_GUARD} END")
    else:
        op.execute("CREATE TRIGGER audit_entries_no_replace BEFORE INSERT ON audit_entries"
                   f" BEGIN{_SEQ_GUARD}{_PREV_HASH_GUARD}{_TERMINAL_GUARD} END")
