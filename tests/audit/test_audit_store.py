"""The audit store on a real SQLite file and a real PostgreSQL database, with real OS processes appending at once.

Tests that take ``store``/``store_url``/``db_url``/``raw`` run on both
backends (tests/audit/conftest.py); the SQLite-only ones at the end are about
SQLite itself. Worker functions live at module level because the 'spawn'
start method imports this module in each child, as a fresh Celery worker
process would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from audit import (
    KINDS,
    TERMINAL_KINDS,
    AuditEntry,
    AuditError,
    AuditStore,
    DuplicateTerminalError,
    InvalidEntryError,
    make_engine,
    migrate,
    verify_chain,
)
from audit.chain import GENESIS_HASH, document_hash
from audit.db import SQLITE_CACHE_KIB, VERSION_TABLE, migration_options
from audit.tables import audit_metadata
from tests.audit.conftest import RawDB
from tests.child_processes import CHILDREN

JOIN_TIMEOUT_S = 120


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A migrated SQLite file, for the tests about SQLite itself."""
    path = tmp_path / "var" / "audit.db"
    engine = make_engine(_url(path))
    migrate(engine)
    engine.dispose()
    return path


def _append(store: AuditStore, kind: str, request_id: str, **body: Any) -> AuditEntry:
    return store.append(
        kind, request_id, principal="alice", team="blue", model="tiny", body=body, policy_revision="rev-1"
    )


# -- append and read back ----------------------------------------------------


def test_append_returns_what_reads_back(store: AuditStore, store_url: str) -> None:
    first = _append(store, "request", "r1", prompt="hi", params=(1, 2), decision={"allow": True, "reasons": []})
    last = _append(store, "completion", "r1", output="hello", tokens={"completion": 2})

    assert (first.seq, last.seq, last.prev_hash) == (2, 3, first.hash)  # entry 1: the format boundary
    assert first.body["params"] == [1, 2]  # stored as its JSON round-trip
    assert first.created_at.tzinfo is timezone.utc
    assert first.terminal_request_id is None and last.terminal_request_id == "r1" and last.is_terminal

    # A different engine (as another process would have) sees identical entries.
    other = AuditStore(make_engine(store_url))
    boundary = other.get(1)
    assert boundary is not None and (boundary.kind, boundary.body, boundary.format) == ("chain_format", {"format": 2}, 1)
    assert (boundary.prev_hash, first.prev_hash) == (GENESIS_HASH, boundary.hash)
    assert other.get(2) == first and other.get(3) == last and other.get(4) is None
    assert other.entries_for("r1") == [first, last]
    assert other.terminal_for("r1") == last and other.terminal_for("nope") is None
    assert other.head() == last
    assert all(e.expected_hash() == e.hash for e in other.entries_for("r1"))


def test_document_form_is_json_and_self_verifying(store: AuditStore) -> None:
    entry = _append(store, "request", "r1", prompt="héllo", decision={"allow": False})
    doc = json.loads(json.dumps(entry.to_document()))  # plain JSON all the way down
    assert doc["created_at"] == entry.created_at.isoformat(timespec="microseconds")
    assert doc["hash"] == entry.hash and doc["body"] == {"prompt": "héllo", "decision": {"allow": False}}
    assert document_hash(doc) == entry.hash and doc["format"] == 2


def test_tail_and_iteration_keep_seq_order(store: AuditStore) -> None:
    assert store.head() is None and store.tail() == [] and list(store.iter_entries()) == []
    appended = [_append(store, "request", f"r{i}", i=i) for i in range(1, 26)]

    assert [e.seq for e in store.tail(3)] == [24, 25, 26]
    assert store.tail(100)[1:] == appended and store.tail(0) == []
    assert [e.seq for e in store.tail()] == list(range(7, 27))
    assert list(store.iter_entries(since_seq=1, batch=4)) == appended  # crosses batch boundaries
    assert [e.seq for e in store.iter_entries(since_seq=21, batch=2)] == [22, 23, 24, 25, 26]
    assert verify_chain(store).checked == 26


def test_every_kind_is_accepted(store: AuditStore) -> None:
    kinds = sorted(KINDS - {"chain_format"})
    for i, kind in enumerate(kinds):
        assert _append(store, kind, f"r{i}").kind == kind
    assert verify_chain(store).checked == len(kinds) + 1
    with pytest.raises(InvalidEntryError, match="chain_format"):  # only the store writes the boundary
        _append(store, "chain_format", "chain-format-2", format=2)


# -- exactly one terminal entry ---------------------------------------------


def test_second_terminal_entry_is_refused(store: AuditStore) -> None:
    _append(store, "request", "r1", prompt="hi")
    done = _append(store, "completion", "r1", output="x")
    for kind in TERMINAL_KINDS:
        with pytest.raises(DuplicateTerminalError) as caught:
            _append(store, kind, "r1", late=True)
        assert caught.value.request_id == "r1" and caught.value.existing_kind == "completion"
        assert caught.value.__cause__ is not None  # the database's own refusal, chained
    assert isinstance(caught.value, AuditError)

    # Non-terminal entries for the same request are still fine, and the chain is whole.
    note = _append(store, "rejected", "r1", reason="retry with bad input")
    assert store.terminal_for("r1") == done
    assert [e.seq for e in store.entries_for("r1")] == [2, 3, note.seq] and note.seq == 4
    assert verify_chain(store).ok


def test_schema_itself_refuses_a_second_terminal(store: AuditStore, raw: RawDB) -> None:
    """Even a writer that bypasses AuditStore cannot add a second terminal entry."""
    _append(store, "completion", "r1")
    hashes = {"prev": "a" * 64, "hash": "b" * 64}
    with pytest.raises(IntegrityError, match="terminal_request_id"):
        raw.execute(
            "INSERT INTO audit_entries (seq, created_at, request_id, kind, body, terminal_request_id,"
            " prev_hash, hash) VALUES (3, '2024-01-01 00:00:00.000000', 'r1', 'failed', '{}', 'r1', :prev, :hash)",
            hashes,
        )
    with pytest.raises(IntegrityError, match="(?i)check"):  # terminal kind without the column set
        raw.execute(
            "INSERT INTO audit_entries (seq, created_at, request_id, kind, body, prev_hash, hash)"
            " VALUES (3, '2024-01-01 00:00:00.000000', 'r2', 'failed', '{}', :prev, :hash)",
            hashes,
        )
    assert [e.seq for e in store.iter_entries()] == [1, 2]


@pytest.mark.parametrize(
    ("kind", "request_id", "extra", "body"),
    [
        ("nonsense", "r1", {}, {}),
        ("request", "", {}, {}),
        ("request", "r" * 256, {}, {}),
        ("request", "r1", {"principal": 42}, {}),
        ("request", "r1", {}, {"x": float("nan")}),
        ("request", "r1", {}, {"x": object()}),
        ("request", "r1", {}, ["not", "a", "mapping"]),
    ],
)
def test_invalid_input_is_refused_and_nothing_recorded(
    store: AuditStore, kind: str, request_id: str, extra: dict[str, Any], body: Any
) -> None:
    args: dict[str, Any] = dict(principal="alice", team="blue", model="tiny", policy_revision=None)
    args.update(extra)
    with pytest.raises(InvalidEntryError) as caught:
        store.append(kind, request_id, body=body, **args)
    assert isinstance(caught.value, AuditError) and isinstance(caught.value, ValueError)
    assert store.head() is None


@pytest.mark.parametrize("field", ["request_id", "principal", "team", "model", "policy_revision"])
def test_a_nul_character_in_a_name_is_refused_on_both_backends(store: AuditStore, field: str) -> None:
    """PostgreSQL text cannot hold NUL and SQLite can: the store refuses it on both, before the database sees it."""
    first = _append(store, "request", "r1")
    args: dict[str, Any] = dict(principal="alice", team="blue", model="tiny", policy_revision="rev-1")
    request_id = "r\x00evil" if field == "request_id" else "r2"
    if field != "request_id":
        args[field] = "a\x00b"
    with pytest.raises(InvalidEntryError, match=f"{field} must not contain a NUL character") as caught:
        store.append("request", request_id, body={}, **args)
    assert isinstance(caught.value, ValueError) and caught.value.__cause__ is None  # not a database error
    assert store.head() == first and verify_chain(store).ok
    # NUL inside a body is JSON's business (escaped as \u0000) and is kept on both.
    clean = args if field == "request_id" else {**args, field: "ok"}
    kept = store.append("request", "r3", body={"text": "a\x00b"}, **clean)
    assert store.get(kept.seq) == kept and kept.body == {"text": "a\x00b"} and verify_chain(store).ok


def test_requests_without_terminal_are_found_in_their_window_only(store: AuditStore) -> None:
    old_open = _append(store, "request", "old-open")
    ended = _append(store, "request", "ended")
    _append(store, "rejected", "bad-input")
    open_a = _append(store, "request", "open-a")
    open_b = _append(store, "request", "open-b")
    _append(store, "completion", "ended", output="x")
    _append(store, "failed", "ended-without-request")
    late = _append(store, "request", "too-late")

    window = dict(before=late.created_at, after=ended.created_at)
    assert store.requests_without_terminal(**window) == [open_a, open_b]
    assert store.requests_without_terminal(before=late.created_at) == [old_open, open_a, open_b]
    assert store.requests_without_terminal(before=open_a.created_at, after=open_a.created_at) == []

    # Pages: each starts after the last entry of the one before, nothing twice or skipped.
    first = store.requests_without_terminal(**window, limit=1)
    second = store.requests_without_terminal(**window, limit=1, page_after=first[-1])
    assert first + second == [open_a, open_b]
    assert store.requests_without_terminal(**window, page_after=open_b) == []

    # A terminal written later takes the request out.
    _append(store, "timed_out", "open-a")
    assert store.requests_without_terminal(**window) == [open_b]
    with pytest.raises(ValueError):
        store.requests_without_terminal(**window, limit=0)


# -- several processes at once ------------------------------------------------


def _append_many(url: str, worker: int, count: int, barrier: Any) -> None:
    """Child process: append ``count`` request/terminal entries as fast as possible."""
    store = AuditStore(make_engine(url))
    barrier.wait()
    for i in range(count):
        rid = f"w{worker}-{i}"
        if i % 2 == 0:
            store.append("request", rid, principal=f"p{worker}", team="t", model="m", body={"i": i}, policy_revision="1")
        else:
            store.append("completion", rid, principal=f"p{worker}", team="t", model="m", body={"i": i}, policy_revision="1")


def _race_terminals(url: str, request_ids: list[str], barrier: Any, results: Any) -> None:
    """Child process: try to finish every request; report which ones this process won."""
    store = AuditStore(make_engine(url))
    won: list[str] = []
    barrier.wait()
    for rid in request_ids:
        try:
            store.append("completion", rid, principal="w", team="t", model="m", body={}, policy_revision=None)
            won.append(rid)
        except DuplicateTerminalError:
            pass
    results.put(won)


def _run(processes: list[Any]) -> None:
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_concurrent_processes_leave_one_unbroken_chain(store_url: str, store: AuditStore) -> None:
    workers, per_worker = 4, 50
    barrier = CHILDREN.Barrier(workers)
    _run([CHILDREN.Process(target=_append_many, args=(store_url, w, per_worker, barrier)) for w in range(workers)])

    entries = list(store.iter_entries())
    assert [e.seq for e in entries] == list(range(1, workers * per_worker + 2))  # the boundary, then theirs
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(entries, entries[1:]))
    for w in range(workers):
        assert sum(e.principal == f"p{w}" for e in entries) == per_worker
    result = verify_chain(store)
    assert result.ok and result.checked == workers * per_worker + 1


def test_racing_terminal_writers_have_exactly_one_winner_per_request(store_url: str, store: AuditStore) -> None:
    request_ids = [f"r{i}" for i in range(30)]
    for rid in request_ids:
        _append(store, "request", rid)
    barrier, results = CHILDREN.Barrier(2), CHILDREN.Queue()
    processes = [CHILDREN.Process(target=_race_terminals, args=(store_url, request_ids, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    won = [results.get(timeout=JOIN_TIMEOUT_S) for _ in processes]  # drain before join
    _run_joined(processes)

    assert sorted(won[0] + won[1]) == sorted(request_ids)  # each request won exactly once
    for rid in request_ids:
        assert sum(e.is_terminal for e in store.entries_for(rid)) == 1
    assert verify_chain(store).ok


def _run_joined(processes: list[Any]) -> None:
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def _migrate_only(url: str, barrier: Any) -> None:
    engine = make_engine(url)
    barrier.wait()
    migrate(engine)


@pytest.mark.parametrize("attempt", [1, 2])
def test_processes_starting_together_can_all_migrate(db_url: str, attempt: int) -> None:
    """Workers opening a fresh database together: the switch to WAL and the migration must queue, not fail."""
    barrier = CHILDREN.Barrier(8)
    _run([CHILDREN.Process(target=_migrate_only, args=(db_url, barrier)) for _ in range(8)])
    engine = make_engine(db_url)
    assert _versions(engine) == ["audit_0007"]
    engine.dispose()


# -- schema and migrations ---------------------------------------------------


def _versions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def test_migrate_is_idempotent_and_keeps_data(store: AuditStore) -> None:
    entry = _append(store, "request", "r1")
    migrate(store.engine)
    migrate(store.engine)
    assert _versions(store.engine) == ["audit_0007"]
    assert store.get(2) == entry


def _schema_diff(engine: Engine) -> list[Any]:
    """What autogenerate would change to make the database match audit.tables."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts=migration_options()), audit_metadata)


def test_models_match_the_migrations(store: AuditStore) -> None:
    assert _schema_diff(store.engine) == []


def test_gateway_tables_and_history_are_left_alone(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('gateway_0042')"))
    migrate(engine)
    with engine.connect() as conn:
        assert list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == ["gateway_0042"]
        conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one()
    assert _versions(engine) == ["audit_0007"]
    assert _schema_diff(engine) == []  # autogenerate would not drop the gateway's table
    engine.dispose()


def test_sqlite_connections_are_tuned_for_many_processes(db_path: Path) -> None:
    with make_engine(_url(db_path)).connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("busy_timeout") == 30000
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("foreign_keys") == 1
        assert pragma("cache_size") == -SQLITE_CACHE_KIB  # negative: KiB, not pages


def test_every_sqlite_connection_zeroes_what_it_frees(db_path: Path) -> None:
    """``secure_delete`` on every connection, not only prune's: a page split or a dropped table moves an erased
    prompt's bytes too. SQLite's own default is off unless built with SQLITE_SECURE_DELETE (Debian's is on), so
    each connection first gets the stock default here, as on python.org's or Homebrew's build."""
    engine = make_engine(_url(db_path))
    event.listen(engine, "connect", lambda dbapi_conn, _record: dbapi_conn.execute("PRAGMA secure_delete = OFF"),
                 insert=True)  # before make_engine's own hook
    engine.dispose()  # no connection made before the listener stays pooled
    try:
        with engine.connect() as first, engine.connect() as second:
            assert [conn.exec_driver_sql("PRAGMA secure_delete").scalar() for conn in (first, second)] == [1, 1]
    finally:
        engine.dispose()


def test_audit_imports_neither_gateway_nor_workers() -> None:
    code = (
        "import sys, audit, audit.db, audit.store, audit.verify;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gateway', 'workers'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# -- failing closed ----------------------------------------------------------


def _assert_clean_audit_error(caught: pytest.ExceptionInfo[AuditError]) -> None:
    assert not isinstance(caught.value, SQLAlchemyError)
    assert caught.value.__cause__ is not None and str(caught.value)


def test_directory_where_the_file_should_be_gives_audit_error(tmp_path: Path) -> None:
    (tmp_path / "audit.db").mkdir()
    engine = make_engine(_url(tmp_path / "audit.db"))
    with pytest.raises(AuditError) as caught:
        migrate(engine)
    _assert_clean_audit_error(caught)
    with pytest.raises(AuditError) as caught:
        _append(AuditStore(engine), "request", "r1")
    _assert_clean_audit_error(caught)
    with pytest.raises(AuditError):
        AuditStore(engine).tail()


def test_read_only_database_gives_audit_error(db_path: Path) -> None:
    """Opened read-only (works even as root, unlike chmod): reads work, appends fail closed."""
    read_only = AuditStore(make_engine(f"sqlite:///file:{db_path}?mode=ro&uri=true"))
    assert read_only.tail() == []
    with pytest.raises(AuditError) as caught:
        _append(read_only, "request", "r1")
    _assert_clean_audit_error(caught)
    assert "readonly" in str(caught.value)


def test_unmigrated_database_gives_audit_error(db_url: str, backend: str) -> None:
    store = AuditStore(make_engine(db_url))
    for attempt in (lambda: _append(store, "request", "r1"), lambda: store.terminal_for("r1"), store.tail):
        with pytest.raises(AuditError) as caught:
            attempt()
        _assert_clean_audit_error(caught)
        assert ("no such table" if backend == "sqlite" else "does not exist") in str(caught.value)
    store.engine.dispose()


def test_uncreatable_folder_gives_audit_error(tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("not a folder")
    with pytest.raises(AuditError) as caught:
        make_engine(_url(tmp_path / "plainfile" / "audit.db"))
    _assert_clean_audit_error(caught)


@pytest.mark.parametrize("url", ["not a url", "nosuchdialect://x/y"])
def test_unusable_url_gives_audit_error(url: str) -> None:
    with pytest.raises(AuditError) as caught:
        make_engine(url)
    _assert_clean_audit_error(caught)
