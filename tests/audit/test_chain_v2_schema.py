"""Schema v2 (audit_0002) on real SQLite files: the upgrade keeps old chains verifying, the guards hold.

The guards are a fence against mistakes, not the guarantee (the chain and
the signed checkpoints are): they are tested here with plain ``sqlite3``,
as someone with the file and no ill intent beyond a careless statement would
use it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.db import VERSION_TABLE
from tests.audit.old_append import old_append

V1_BODIES = [
    {"prompt": "héllo ✓", "decision": {"allow": True, "reasons": []}},
    {"output": "answer", "usage": {"total_tokens": 3}},
    {"z": 1, "a": [1, 2.5, None, True]},
]


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


@pytest.fixture
def v1_store(tmp_path: Path) -> Path:
    """A store made at audit_0001 with a few entries written the old way."""
    path = tmp_path / "old.db"
    engine = make_engine(_url(path))
    migrate(engine, "audit_0001")
    for i, body in enumerate(V1_BODIES):
        old_append(engine, "request", f"r{i}", body)
    old_append(engine, "completion", "r0", {"output": "done"})
    engine.dispose()
    return path


def test_upgrade_keeps_every_stored_byte_and_the_chain_verifies(v1_store: Path) -> None:
    before = _raw(v1_store, "SELECT * FROM audit_entries ORDER BY seq")
    engine = make_engine(_url(v1_store))
    migrate(engine)
    with engine.connect() as conn:
        assert list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()) == ["audit_0007"]

    after = _raw(v1_store, "SELECT seq, created_at, request_id, kind, principal, team, model, body, policy_revision,"
                           " terminal_request_id, prev_hash, hash, payload, payload_digest FROM audit_entries ORDER BY seq")
    assert [row[:12] for row in after[: len(before)]] == before  # value for value, body text included
    assert all(row[12:] == (None, None) for row in after)
    boundary = after[-1]
    assert len(after) == len(before) + 1
    assert (boundary[2], boundary[3], boundary[7]) == ("chain-format-2", "chain_format", '{"format":2}')
    assert boundary[10] == before[-1][11]  # linked to the old head

    result = verify_chain(AuditStore(engine))
    assert result.ok and result.checked == len(before) + 1, result
    migrate(engine)  # idempotent: no second boundary
    assert _raw(v1_store, "SELECT count(*) FROM audit_entries")[0][0] == len(before) + 1


def test_upgrade_keeps_indexes_and_makes_the_new_guards(v1_store: Path) -> None:
    migrate(make_engine(_url(v1_store)), "audit_0002")  # this revision's own indexes (audit_0003 adds more)
    names = {name for (name,) in _raw(v1_store, "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')"
                                                " AND name NOT LIKE 'sqlite_autoindex%'")}
    assert names == {
        "ix_audit_entries_request_id", "ix_audit_entries_created_at",
        "audit_entries_no_update", "audit_entries_no_delete", "audit_entries_no_replace",
        "audit_checkpoints_no_update", "audit_checkpoints_no_delete", "audit_checkpoints_no_replace",
    }
    plan = " ".join(str(r) for r in _raw(v1_store, "EXPLAIN QUERY PLAN SELECT * FROM audit_entries WHERE request_id = 'x'"))
    assert "ix_audit_entries_request_id" in plan


def test_an_empty_store_is_upgraded_without_a_boundary(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    engine = make_engine(_url(path))
    migrate(engine, "audit_0001")
    migrate(engine)
    assert _raw(path, "SELECT count(*) FROM audit_entries") == [(0,)]  # the first append writes it


# -- the guards ----------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    engine = make_engine(_url(path))
    migrate(engine)
    store = AuditStore(engine)
    for i in range(3):
        store.append("request", f"r{i}", principal="a", team="t", model="m", body={"i": i}, policy_revision=None)
    store.append("completion", "r0", principal="a", team="t", model="m", body={"done": True}, policy_revision=None)
    engine.dispose()
    return path


def _execute(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("statement", [
    "INSERT OR REPLACE INTO audit_entries SELECT * FROM audit_entries WHERE seq = 2",
    "REPLACE INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
    " SELECT seq, created_at, 'forged', kind, '{}', prev_hash, hash FROM audit_entries WHERE seq = 3",
    # a second terminal entry that would replace the first
    "INSERT OR REPLACE INTO audit_entries (seq, created_at, request_id, kind, body, terminal_request_id,"
    " prev_hash, hash) VALUES (99, '2024-01-01 00:00:00.000000', 'r0', 'failed', '{}', 'r0', 'p', 'h')",
    "INSERT INTO audit_entries SELECT * FROM audit_entries WHERE seq = 2"
    " ON CONFLICT (seq) DO UPDATE SET body = '{\"forged\":1}'",
])
def test_replacing_an_entry_is_refused(db: Path, statement: str) -> None:
    before = _raw(db, "SELECT * FROM audit_entries ORDER BY seq")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        _execute(db, statement)
    assert _raw(db, "SELECT * FROM audit_entries ORDER BY seq") == before
    assert verify_chain(AuditStore(make_engine(_url(db)))).ok


def test_a_fork_at_a_new_seq_replaces_nothing_and_verify_reports_it(db: Path) -> None:
    """prev_hash is not unique since audit_0005: a row naming an existing entry's predecessor deletes no entry.

    Under audit_0004 an INSERT OR REPLACE of such a row would have deleted the
    entry holding that prev_hash (the guard refused it); with no unique key
    on prev_hash there is nothing for REPLACE to delete, so the row is one
    more forged row, which verify reports.
    """
    before = _raw(db, "SELECT * FROM audit_entries ORDER BY seq")
    _execute(db, "INSERT OR REPLACE INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
                 " SELECT 99, created_at, 'x', 'request', '{}', prev_hash, 'f' FROM audit_entries WHERE seq = 2")
    assert _raw(db, "SELECT * FROM audit_entries WHERE seq < 99 ORDER BY seq") == before  # every entry kept
    result = verify_chain(AuditStore(make_engine(_url(db))))
    assert not result.ok and result.first_bad_seq == 99, result


@pytest.mark.parametrize("statement", [
    "UPDATE audit_entries SET body = '{}' WHERE seq = 3",
    "UPDATE audit_entries SET payload = NULL, team = 'other' WHERE seq = 3",
    "UPDATE audit_entries SET payload_digest = '0' WHERE seq = 3",
    "UPDATE audit_entries SET payload = '{\"salt\":\"00\"}' WHERE seq = 3",
    "UPDATE audit_entries SET seq = seq + 100 WHERE seq = 2",
    "DELETE FROM audit_entries WHERE seq = 3",
])
def test_changes_other_than_erasing_a_payload_are_refused(db: Path, statement: str) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        _execute(db, statement)


def test_erasing_a_payload_is_allowed(db: Path) -> None:
    _execute(db, "UPDATE audit_entries SET payload = NULL WHERE seq = 3")
    _execute(db, "UPDATE audit_entries SET payload = NULL")


@pytest.mark.parametrize("statement", [
    "INSERT OR REPLACE INTO audit_checkpoints VALUES (1, 'h2', '2024-01-01 00:00:00.000000', 'k', 's', 0)",
    "UPDATE audit_checkpoints SET head_hash = 'x'",
    "DELETE FROM audit_checkpoints",
])
def test_checkpoints_are_append_only(db: Path, statement: str) -> None:
    _execute(db, "INSERT INTO audit_checkpoints VALUES (1, 'h', '2024-01-01 00:00:00.000000', 'k', 's', 0)")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        _execute(db, statement)
    assert _raw(db, "SELECT seq, head_hash FROM audit_checkpoints") == [(1, "h")]
