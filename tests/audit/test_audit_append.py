"""The DBAPI append path: the body hashed is the body stored, and old trails keep growing as one chain after the upgrade.

The append serialises the body once and runs compiled statements on the
engine's driver connection (audit/appender.py); these tests hold it to the
byte format of audit/chain.py, to what the old SQLAlchemy Core append
stored (tests/audit/old_append.py), to the error mapping callers rely on,
and to one unbroken chain when old writers in several processes wrote a
trail at audit_0001, and new writers in several processes go on after the
upgrade (old writers must be stopped before it: their entries after the
format boundary are reported); on SQLite and on PostgreSQL (tests/audit/conftest.py).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_mock_engine
from sqlalchemy.exc import IntegrityError

from audit import (
    AuditError,
    AuditStore,
    CorruptEntryError,
    DuplicateTerminalError,
    InvalidEntryError,
    make_engine,
    migrate,
    verify_chain,
)
from audit.append_plan import append_statements
from audit.chain import HASHED_FIELDS, canonical_json, canonical_text, chain_hash, entry_payload, entry_payload_with_body
from audit.db import lock_statements
from audit.lookup import KeyedLookup
from audit.tables import audit_table
from tests.audit.conftest import RawDB
from tests.audit.old_append import old_append
from tests.child_processes import CHILDREN

JOIN_TIMEOUT_S = 120

BODIES: list[dict[str, Any]] = [
    {},
    {"prompt": "héllo ✓ 日本", "params": {"temperature": 0.7, "top_p": 1.0, "stop": ["\n"], "seed": None}},
    {"z": 1, "a": {"y": [1, 2.5, -0.0, 1e300, True, None], "x": "\u2028 \"quoted\" \\ \t"}},
    {"messages": [{"role": "user", "content": "x" * 5000}], "big": 2**70, "neg": -3},
]


@pytest.fixture
def old_db_url(db_url: str) -> str:
    """A store still at audit_0001, where the old append wrote its trails."""
    engine = make_engine(db_url)
    migrate(engine, "audit_0001")
    engine.dispose()
    return db_url


def _upgrade(url: str) -> AuditStore:
    engine = make_engine(url)
    migrate(engine)
    return AuditStore(engine)


def _append(store: AuditStore, kind: str, request_id: str, body: dict[str, Any]) -> Any:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body=body,
                        policy_revision="rev-1")


def _raw_rows(url: str) -> list[tuple[Any, ...]]:
    """``(seq, created_at, body text as stored, prev_hash, hash)`` of every entry (see RawDB.stored_rows)."""
    raw = RawDB(url, "sqlite" if url.startswith("sqlite") else "postgresql")
    try:
        return raw.stored_rows()
    finally:
        raw.dispose()


# -- the byte format ----------------------------------------------------------


@pytest.mark.parametrize("body", BODIES)
def test_payload_with_body_text_is_the_entry_payload(body: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "seq": 12, "created_at": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc), "request_id": "r", "kind": "request",
        "principal": "ä", "team": None, "model": "m", "policy_revision": None, "terminal_request_id": None,
        "prev_hash": "cd" * 32,
    }
    assert entry_payload_with_body(fields, canonical_text(body)) == entry_payload({**fields, "body": body})


def test_payload_with_body_text_insists_on_the_other_hashed_fields() -> None:
    others = {name: None for name in HASHED_FIELDS if name != "body"}
    with pytest.raises(ValueError, match="hashed fields mismatch"):
        entry_payload_with_body({**others, "body": {}}, "{}")
    with pytest.raises(ValueError, match="hashed fields mismatch"):
        entry_payload_with_body({k: v for k, v in others.items() if k != "seq"}, "{}")


@pytest.mark.parametrize("body", BODIES)
def test_stored_body_is_byte_for_byte_the_canonical_json_that_was_hashed(
        store: AuditStore, store_url: str, backend: str, body: dict[str, Any]) -> None:
    entry = _append(store, "request", "r1", body)
    [(seq, created_at, stored_body, prev_hash, stored_hash)] = _raw_rows(store_url)[1:]  # after the boundary

    assert stored_body.encode("utf-8") == canonical_json(body)
    others = {k: v for k, v in entry.hashed_fields().items() if k != "body"}
    assert "payload_digest" in others and entry.format == 2
    assert stored_hash == entry.hash == chain_hash(prev_hash, entry_payload_with_body(others, stored_body, format=2))
    # The other columns are stored as SQLAlchemy's own insert stored them.
    if backend == "sqlite":
        assert created_at == entry.created_at.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    else:  # timestamptz: the same instant, to the microsecond
        assert created_at.tzinfo is not None and created_at == entry.created_at
    assert store.get(seq) == entry and verify_chain(store).ok


def test_body_with_non_string_keys_is_stored_as_it_reads_back(store: AuditStore, store_url: str) -> None:
    """``{2: …, 10: …}`` sorts as numbers but reads back as strings: the hash must be of what reads back."""
    entry = _append(store, "request", "r1", {"bias": {2: 0.5, 10: -1.0}, "list": [{3: "c", 20: "d"}]})
    assert entry.body == {"bias": {"2": 0.5, "10": -1.0}, "list": [{"3": "c", "20": "d"}]}
    [(_, _, stored_body, _, _)] = _raw_rows(store_url)[1:]
    assert stored_body.encode("utf-8") == canonical_json(entry.body)
    assert store.get(2) == entry and verify_chain(store).ok


def test_lone_surrogate_is_refused_before_the_database(store: AuditStore) -> None:
    with pytest.raises(InvalidEntryError):
        _append(store, "request", "r1", {"text": "\ud800"})
    assert store.head() is None


# -- old trails, errors ---------------------------------------------------------


def test_trail_written_by_the_old_append_keeps_growing_as_one_chain(old_db_url: str) -> None:
    old_engine = make_engine(old_db_url)
    for i, body in enumerate(BODIES):
        old_append(old_engine, "request", f"old-{i}", body)
    old_append(old_engine, "completion", "old-0", {"output": "done"})
    stored_before = _raw_rows(old_db_url)
    store = _upgrade(old_db_url)
    assert verify_chain(store).ok

    new = [_append(store, "completion", f"old-{i}", body) for i, body in enumerate(BODIES) if i > 0]
    new.append(_append(store, "request", "new", {"last": True}))

    result = verify_chain(store)
    assert result.ok and result.checked == len(stored_before) + 1 + len(new)
    assert result.format_boundary == len(stored_before) + 1
    assert _raw_rows(old_db_url)[: len(stored_before)] == stored_before
    assert [store.get(e.seq) for e in new] == new
    assert [store.get(seq).format for seq in (1, len(stored_before) + 1, new[0].seq)] == [1, 1, 2]  # type: ignore[union-attr]

    # An old writer still running after the upgrade: its entry is reported, and said to be one.
    old_append(old_engine, "request", "old-again", {"after": "new"})
    result = verify_chain(store)
    assert (result.ok, result.first_bad_seq) == (False, new[-1].seq + 1)
    assert "format mismatch" in (result.problem or "")


def test_duplicate_terminal_after_an_old_terminal_raises_as_before(old_db_url: str, backend: str) -> None:
    old_engine = make_engine(old_db_url)
    old_append(old_engine, "request", "r1", {})
    old_append(old_engine, "timed_out", "r1", {"after_s": 30})
    store = _upgrade(old_db_url)
    with pytest.raises(DuplicateTerminalError) as caught:
        _append(store, "completion", "r1", {"output": "late"})
    assert caught.value.request_id == "r1" and caught.value.existing_kind == "timed_out"
    # The database's refusal, chained as SQLAlchemy wraps it, like the Core path did.
    assert isinstance(caught.value.__cause__, IntegrityError)
    if backend == "sqlite":
        assert isinstance(caught.value.__cause__.orig, sqlite3.IntegrityError)
    else:
        import psycopg.errors

        assert isinstance(caught.value.__cause__.orig, psycopg.errors.UniqueViolation)
    assert store.head().seq == 3 and verify_chain(store).ok  # type: ignore[union-attr]  # 3: the boundary


def test_other_integrity_errors_stay_plain_audit_errors(store: AuditStore, raw: RawDB) -> None:
    """A refusal that is not a second terminal (here a unique index an operator added) is an AuditError naming it."""
    _append(store, "request", "r1", {})
    raw.execute("CREATE UNIQUE INDEX ux_test_one_entry_per_request ON audit_entries (request_id)")
    with pytest.raises(AuditError) as caught:
        _append(store, "rejected", "r1", {})
    assert type(caught.value) is AuditError and "request_id" in str(caught.value)
    assert isinstance(caught.value.__cause__, IntegrityError)
    assert store.head().seq == 2 and verify_chain(store).ok  # type: ignore[union-attr]  # nothing written


def test_a_writer_with_a_stale_head_collides_on_seq(store: AuditStore, raw: RawDB) -> None:
    """What prev_hash's unique index guarded until audit_0005: a fork from a writer that read an old head.

    seq and prev_hash come from the same head row, so the fork takes an
    existing seq and the primary key refuses it, with no index on prev_hash.
    """
    _append(store, "request", "r1", {})
    _append(store, "request", "r2", {})
    [(seq, prev_hash)] = raw.rows("SELECT seq, prev_hash FROM audit_entries WHERE request_id = 'r2'")
    with pytest.raises(IntegrityError, match="seq|pk_audit_entries"):
        raw.execute("INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
                    " VALUES (:seq, '2024-01-01 00:00:00.000000', 'fork', 'request', '{}', :prev, :hash)",
                    {"seq": seq, "prev": prev_hash, "hash": "e" * 64})
    assert [e.request_id for e in store.iter_entries()][1:] == ["r1", "r2"] and verify_chain(store).ok


def test_terminal_for_reports_a_tampered_row_as_corrupt(store: AuditStore, raw: RawDB) -> None:
    done = _append(store, "completion", "r1", {"output": "x"})
    assert store.terminal_for("r1") == done and store.terminal_for("r2") is None
    if raw.backend == "postgresql":
        # The json type refuses text that is not JSON; what is left is a value psycopg's
        # loader cannot build (a driver DataError at fetch time): a corrupt entry, never an entry.
        raw.without_guards("UPDATE audit_entries SET created_at = 'infinity' WHERE seq = 2")
    else:
        raw.without_guards("UPDATE audit_entries SET body = '{not json' WHERE seq = 2")
    with pytest.raises(CorruptEntryError):
        store.terminal_for("r1")
    with pytest.raises(CorruptEntryError) as caught:  # the other reads name the row
        store.get(2)
    assert caught.value.seq == 2
    seen = []
    with pytest.raises(CorruptEntryError) as caught:
        for entry in store.iter_entries():
            seen.append(entry.seq)
    assert seen == [1] and caught.value.seq == 2  # everything before it first
    assert store.get(1) is not None and store.terminal_for("r2") is None  # the sound rows still read


# -- the PostgreSQL statements as compiled (they also run on a real server above) -------


def test_postgresql_statements_bind_every_column_and_take_the_advisory_lock() -> None:
    engine = create_mock_engine("postgresql+psycopg://", lambda *_a, **_k: None)
    appender = append_statements(engine)  # type: ignore[arg-type]
    insert_sql = appender.insert_sql
    for column in audit_table.columns:
        assert f"%({column.name})s" in insert_sql
    assert "%(body)s::JSON" in insert_sql  # canonical text cast to the JSON column, not re-serialised
    assert "%(payload)s::JSON" in insert_sql
    assert appender.head_sql.split() == "SELECT audit_entries.seq, audit_entries.hash, audit_entries.created_at " \
        "FROM audit_entries " \
        "ORDER BY audit_entries.seq DESC LIMIT 1".split()
    # The lock, and the transaction's idle limit (5 s: half the default 30 s busy timeout is longer), in one trip.
    assert lock_statements(engine) == (  # type: ignore[arg-type]
        "SELECT set_config('idle_in_transaction_session_timeout', '5000', true), "
        "pg_advisory_xact_lock(6947504604346056705)",)
    assert "%(key)s" in KeyedLookup(engine, audit_table.c.terminal_request_id, lambda _seq: 2)._sql  # type: ignore[arg-type]


def test_databases_without_the_write_lock_are_refused() -> None:
    engine = create_mock_engine("mysql://", lambda *_a, **_k: None)
    with pytest.raises(AuditError, match="SQLite and PostgreSQL"):
        AuditStore(engine).append("request", "r1", principal=None, team=None, model=None, body={},  # type: ignore[arg-type]
                                  policy_revision=None)


# -- old and new writers in several processes ----------------------------------


def _writer(url: str, worker: int, count: int, use_old: bool, barrier: Any) -> None:
    """Child process: append request/completion pairs with the old or the new code."""
    engine = make_engine(url)
    store = AuditStore(engine)
    barrier.wait()
    for i in range(count):
        rid, kind = f"w{worker}-{i // 2}", ("request", "completion")[i % 2]
        body = {"worker": worker, "i": i, "text": "é" * (i % 7)}
        if use_old:
            old_append(engine, kind, rid, body, principal=f"p{worker}")
        else:
            store.append(kind, rid, principal=f"p{worker}", team="t", model="m", body=body, policy_revision="1")


def _run_writers(url: str, plan: list[bool], per_worker: int, first_worker: int = 0) -> None:
    barrier = CHILDREN.Barrier(len(plan))
    processes = [CHILDREN.Process(target=_writer, args=(url, first_worker + w, per_worker, old, barrier))
                 for w, old in enumerate(plan)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_old_writers_then_new_writers_in_several_processes_leave_one_unbroken_chain(old_db_url: str) -> None:
    per_worker = 30
    _run_writers(old_db_url, [True, True], per_worker)  # the old code, at audit_0001
    store = _upgrade(old_db_url)
    _run_writers(old_db_url, [False, False, False], per_worker, first_worker=2)  # the new code

    entries = list(store.iter_entries())
    old_count, total = 2 * per_worker, 5 * per_worker + 1
    assert [e.seq for e in entries] == list(range(1, total + 1))
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(entries, entries[1:]))
    assert all(sum(e.principal == f"p{w}" for e in entries) == per_worker for w in range(5))
    assert entries[old_count].kind == "chain_format"
    assert [e.format for e in entries] == [1] * (old_count + 1) + [2] * (total - old_count - 1)
    result = verify_chain(store)
    assert result.ok and result.checked == total and result.format_boundary == old_count + 1
    # New writers stored their canonical text; the old ones their JSON column's own serialisation.
    for (_, _, stored_body, _, _), entry in zip(_raw_rows(old_db_url), entries):
        assert json.loads(stored_body) == entry.body
        if entry.format == 2:
            assert stored_body.encode("utf-8") == canonical_json(entry.body)


def test_an_entry_without_payload_stores_sql_null(store: AuditStore, raw: RawDB) -> None:
    """Not the JSON text ``null``: erasure writes SQL NULL and the guards and searches expect it."""
    _append(store, "rejected", "r1", {"status": 400})
    assert raw.rows("SELECT count(*) FROM audit_entries WHERE payload IS NULL") == [(2,)]  # with the boundary
