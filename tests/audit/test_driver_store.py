"""The driver store (audit/driver_store.py): the workers' appends and terminal look-ups without SQLAlchemy.

It must write exactly what :class:`audit.AuditStore` writes, read back exactly
what it reads, fail as it fails, on both backends; the plan it runs on travels
as JSON from a process where SQLAlchemy is loaded (the worker's store-prep child).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from audit import AuditError, AuditStore, DuplicateTerminalError, InvalidEntryError, make_engine, migrate, verify_chain
from audit.append_plan import driver_plan
from audit.driver_plan import DriverPlan
from audit.driver_store import DriverStore
from tests.audit.conftest import RawDB

ROOT = Path(__file__).resolve().parents[2]


def _driver(store: AuditStore) -> DriverStore:
    """A driver store on ``store``'s database, its plan handed over as JSON as the worker gets it."""
    return DriverStore(DriverPlan.from_json(driver_plan(store.engine).to_json()))


def _request(store, request_id: str, **extra):
    return store.append("request", request_id, principal="alice", team="research", model="tiny",
                        body={"decision": {"allow": True}, "n": [1, 2.5, "é"]}, policy_revision="rev",
                        payload={"prompt": f"hello {request_id}"}, **extra)


def _completion(store, request_id: str):
    return store.append("completion", request_id, principal="alice", team="research", model="tiny",
                        body={"usage": {"total_tokens": 3}}, policy_revision="rev",
                        payload={"output": f"answer to {request_id}"})


def test_its_entries_are_the_store_s_and_the_chain_holds(store: AuditStore) -> None:
    driver = _driver(store)
    try:
        written = [_request(store, "r1"), _request(driver, "r2"), _completion(driver, "r1"),
                   _completion(store, "r2"), _request(driver, "r3")]
        # What each append returned is what the store reads back, whichever wrote it.
        assert [store.get(e.seq) for e in written] == written
        assert [e.seq for e in written] == [2, 3, 4, 5, 6]  # after the chain_format boundary
        assert driver.terminal_for("r1") == store.terminal_for("r1") == written[2]
        assert driver.terminal_for("r2") == store.terminal_for("r2") == written[3]
        assert driver.terminal_for("r3") is None
        assert verify_chain(store).ok and verify_chain(store).checked == 6
    finally:
        driver.close()


def test_on_an_empty_store_its_first_append_writes_the_boundary_first(store: AuditStore, raw: RawDB) -> None:
    raw.without_guards("DELETE FROM audit_entries")  # a store migrated but never appended to
    driver = _driver(store)
    try:
        first = _request(driver, "r1")
        assert first.seq == 2 and store.boundary_seq() == 1 and driver.boundary_seq() == 1
        assert store.get(1).kind == "chain_format" and verify_chain(store).ok  # type: ignore[union-attr]
    finally:
        driver.close()


def test_a_second_terminal_entry_is_refused_naming_the_first(store: AuditStore) -> None:
    driver = _driver(store)
    try:
        _request(store, "r1")
        _completion(store, "r1")
        with pytest.raises(DuplicateTerminalError) as refused:
            driver.append("failed", "r1", principal="alice", team="research", model="tiny",
                          body={"error": {"code": "worker_error"}}, policy_revision="rev")
        assert refused.value.existing_kind == "completion"
        assert driver.terminal_for("r1").kind == "completion"  # type: ignore[union-attr]
        assert verify_chain(store).checked == 3
    finally:
        driver.close()


@pytest.mark.parametrize("kind, request_id, body", [
    ("no-such-kind", "r1", {}), ("request", "", {}), ("request", "a\x00b", {}), ("request", "x" * 256, {}),
    ("chain_format", "r1", {}), ("request", "r1", {"t": (1, object())}),
])
def test_bad_arguments_are_refused_as_the_store_refuses_them(store: AuditStore, kind: str, request_id: str,
                                                              body: dict) -> None:
    driver = _driver(store)
    try:
        before = store.head()
        for target in (store, driver):
            with pytest.raises(InvalidEntryError):
                target.append(kind, request_id, principal=None, team=None, model=None, body=body,
                              policy_revision=None)
        assert store.head() == before
    finally:
        driver.close()


def test_threads_appending_together_extend_one_chain(store: AuditStore) -> None:
    driver = _driver(store)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(15):
                _request(driver, f"t{thread}-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        result = verify_chain(store)
        assert result.ok and result.checked == 1 + 60
    finally:
        driver.close()


def test_a_locked_database_fails_the_append_closed(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'locked.db'}", busy_timeout_s=0.2)
    migrate(engine)
    store = AuditStore(engine)
    driver = _driver(store)
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
        with pytest.raises(AuditError, match="audit append failed on sqlite:///.*locked"):
            _request(driver, "r1")
        holder.execute("ROLLBACK")
        assert _request(driver, "r1").seq == 2  # and the next one, once the lock is free, goes through
        assert verify_chain(store).checked == 2
    finally:
        holder.close()
        driver.close()
        engine.dispose()


def test_the_plan_carries_the_engine_s_connect_settings_and_no_adapters(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}", busy_timeout_s=7.5)
    try:
        plan = driver_plan(engine)
        assert plan.connect_kwargs["timeout"] == 7.5 and plan.busy_timeout_s == 7.5
        assert DriverPlan.from_json(plan.to_json()) == plan
        with pytest.raises(ValueError, match="version"):
            DriverPlan.from_json(json.dumps({**json.loads(plan.to_json()), "version": 99}))
    finally:
        engine.dispose()


def test_the_driver_store_loads_nothing_of_sqlalchemy() -> None:
    code = ("import sys, audit.driver_store, workers.pool, workers.generation\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlmodel', 'pydantic', "
            "'alembic')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- PostgreSQL: sessions the server ends -----------------------------------------------------------


def test_a_postgresql_session_killed_between_appends_is_replaced(store: AuditStore, backend: str,
                                                                 raw: RawDB) -> None:
    if backend != "postgresql":
        pytest.skip("a PostgreSQL session")
    driver = _driver(store)
    try:
        _request(driver, "r1")
        [(pid,)] = driver._connection.run((), lambda cursor: cursor.execute("SELECT pg_backend_pid()").fetchall())
        [(killed,)] = raw.rows("SELECT count(pg_terminate_backend(:pid))", {"pid": pid})
        assert killed == 1
        assert _completion(driver, "r1").kind == "completion"  # retried on a new session, not failed
        assert [e.kind for e in store.iter_entries()] == ["chain_format", "request", "completion"]
        assert verify_chain(store).ok
    finally:
        driver.close()
