"""audit_0007: the kind CHECK admits ``delivered``, on both backends, without touching a stored row.

On SQLite the table's SQL is edited in ``sqlite_schema`` (SQLite's documented procedure for loosening a
CHECK) instead of rebuilt: the tests hold the result to what a rebuild would give, a CHECK that refuses
every other unknown kind, an intact file, a chain that verifies, and a store whose kept connection (its
statements prepared before the edit) writes the new kind at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from alembic import command
from sqlalchemy import text

from audit import AuditError, AuditStore, make_engine, migrate, verify_chain
from audit.db import MIGRATE_LOCK_KEY, alembic_config, locked_transaction
from audit.kinds import DELIVERED
from tests.audit.conftest import RawDB


def _append(store: AuditStore, kind: str, request_id: str = "req-1") -> None:
    store.append(kind, request_id, principal="alice", team="t", model="m",
                 body={"terminal_seq": 2} if kind == DELIVERED else {"n": 1}, policy_revision="r")


def _version(store: AuditStore) -> str:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version_audit")).scalar()


def _downgrade(store: AuditStore, revision: str = "audit_0006") -> None:
    with locked_transaction(store.engine, MIGRATE_LOCK_KEY) as conn:
        command.downgrade(alembic_config(conn), revision)


def _refuses_bogus_kind(raw: RawDB) -> None:
    with pytest.raises(Exception, match="kind"):
        raw.execute("INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
                    " VALUES (999, :t, 'x', 'bogus', '{}', 'p', 'h')",
                    {"t": "2026-12-05 00:00:00.000000" if raw.backend == "sqlite" else "2026-12-05T00:00:00Z"})


def _table_sql(raw: RawDB) -> str:
    return raw.rows("SELECT sql FROM sqlite_master WHERE name = 'audit_entries'")[0][0]


@pytest.fixture
def old_store(db_url: str) -> Iterator[AuditStore]:
    """A store at audit_0006 holding a request and its end."""
    engine = make_engine(db_url)
    migrate(engine, "audit_0006")
    store = AuditStore(engine)
    _append(store, "request")
    _append(store, "failed")
    yield store
    engine.dispose()


def test_the_upgrade_admits_delivered_and_only_it(old_store: AuditStore, db_url: str, backend: str) -> None:
    with pytest.raises(AuditError):  # the CHECK of audit_0006 refuses the kind this code knows
        _append(old_store, DELIVERED)
    before = [entry.to_document() for entry in old_store.iter_entries()]
    migrate(old_store.engine)
    assert _version(old_store) == "audit_0007"
    _append(old_store, DELIVERED)  # the same store: its kept connection prepared its insert before the edit
    assert [entry.kind for entry in old_store.iter_entries()] == ["chain_format", "request", "failed", DELIVERED]
    assert [entry.to_document() for entry in old_store.iter_entries()][:len(before)] == before
    assert verify_chain(old_store).ok
    raw = RawDB(db_url, backend)
    try:
        _refuses_bogus_kind(raw)
        if backend == "sqlite":
            assert raw.rows("PRAGMA integrity_check") == [("ok",)]
            assert _table_sql(raw).count("'delivered'") == 1
        else:
            assert raw.rows("SELECT convalidated FROM pg_constraint WHERE conname = "
                            "'ck_audit_entries_ck_audit_entries_kind'") == [(True,)]
    finally:
        raw.dispose()


def test_a_second_store_sees_the_new_kind_at_once(old_store: AuditStore, db_url: str) -> None:
    """Another process's store, connected before the upgrade, appends the new kind without reconnecting."""
    other = AuditStore(make_engine(db_url))
    try:
        _append(other, "request", "req-2")  # its connection is open and its statements prepared
        migrate(old_store.engine)
        _append(other, DELIVERED, "req-2")
        assert other.entries_for("req-2")[-1].kind == DELIVERED
        assert verify_chain(other).ok
    finally:
        other.engine.dispose()


def test_the_downgrade_refuses_while_a_delivered_entry_is_stored(old_store: AuditStore) -> None:
    migrate(old_store.engine)
    _append(old_store, DELIVERED)
    with pytest.raises(RuntimeError, match="1 'delivered' entries are stored"):
        _downgrade(old_store)
    assert _version(old_store) == "audit_0007"
    _append(old_store, DELIVERED)  # nothing was changed


def test_the_downgrade_without_one_puts_the_old_check_back(old_store: AuditStore, db_url: str,
                                                           backend: str) -> None:
    migrate(old_store.engine)
    _downgrade(old_store)
    assert _version(old_store) == "audit_0006"
    with pytest.raises(AuditError):
        _append(old_store, DELIVERED)
    migrate(old_store.engine)
    _append(old_store, DELIVERED)
    assert verify_chain(old_store).ok


def test_an_sqlite_table_whose_check_is_not_as_made_is_left_alone(tmp_path: Path) -> None:
    """The edit must find the old list exactly once; a table defined otherwise (here: by hand, its CHECK
    already widened) stops the migration before anything is written."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = make_engine(url)
    raw = RawDB(url, "sqlite")
    try:
        migrate(engine, "audit_0006")
        with raw.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA writable_schema = ON")
            conn.exec_driver_sql("UPDATE sqlite_master SET sql = replace(sql, \"'timed_out')),\", "
                                 "\"'timed_out', 'other')),\") WHERE name = 'audit_entries'")
            version = conn.exec_driver_sql("PRAGMA schema_version").scalar()
            conn.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
            conn.exec_driver_sql("PRAGMA writable_schema = OFF")
        before = _table_sql(raw)
        assert "'other'" in before
        with pytest.raises(AuditError, match="does not hold its kind CHECK as audit_0005 made it"):
            migrate(engine)
        assert _version(AuditStore(engine)) == "audit_0006"
        assert _table_sql(raw) == before
    finally:
        raw.dispose()
        engine.dispose()
