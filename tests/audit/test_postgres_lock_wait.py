"""On PostgreSQL an audit write waits for a lock at most the busy timeout, then fails closed, as on SQLite.

Another session can hold what an append needs for as long as it likes: a
reviewer's ``LOCK TABLE audit_entries`` or a long transaction that took a
strong lock, or a writer stopped while it held the append's advisory lock.
Without ``lock_timeout`` every append (the gateway's request entries, the
workers' terminal entries) waited on it with no end, so every request hung
instead of being refused 503 ``audit_unavailable``. Migrations are the one
wait left unbounded: processes starting together queue behind the one that
migrates, however long its upgrade takes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from audit import AuditError, AuditStore, make_engine, migrate, verify_chain, write_refusal
from audit.append_plan import driver_plan
from audit.db import APPEND_LOCK_KEY, MIGRATE_LOCK_KEY, append_idle_limit_s, lock_statements
from audit.driver_plan import DriverPlan
from audit.driver_store import DriverStore

#: Short, so a refused append comes quickly; what is tested is that it comes at all.
BUSY_S = 1.0
#: Ceiling on a call that must end by itself (not a timing assertion: a hang guard).
HANG_GUARD_S = 60


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


@pytest.fixture
def other_session(store_url: str) -> Iterator[psycopg.Connection]:
    """A session of someone else (a reviewer's psql) on the store's database, in a transaction."""
    conn = psycopg.connect(**_conninfo(store_url))
    yield conn
    conn.rollback()
    conn.close()


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _request(store: AuditStore | DriverStore, request_id: str) -> Any:
    return store.append("request", request_id, principal="alice", team="blue", model="tiny", body={},
                        policy_revision="rev-1")


@pytest.fixture
def short_store(store_url: str) -> Iterator[AuditStore]:
    store = AuditStore(make_engine(store_url, busy_timeout_s=BUSY_S))
    _request(store, "before")  # connected and at the head before the lock is taken
    yield store
    store.engine.dispose()


def _refused_while_held(call: Callable[[], Any]) -> BaseException:
    thread, outcome = _in_thread(call)
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the append waited on the lock with no end"
    assert "error" in outcome, f"the append went through a held lock: {outcome}"
    return outcome["error"]


def test_a_table_locked_by_another_session_fails_the_append_closed(
        short_store: AuditStore, other_session: psycopg.Connection) -> None:
    other_session.execute("LOCK TABLE audit_entries IN ACCESS EXCLUSIVE MODE")
    error = _refused_while_held(lambda: _request(short_store, "during"))
    assert isinstance(error, AuditError) and "lock timeout" in str(error)
    other_session.rollback()
    _request(short_store, "after")  # the lock gone, appends work again on the same store
    assert [e.request_id for e in short_store.iter_entries()][1:] == ["before", "after"]
    assert verify_chain(short_store).ok


def test_the_append_lock_held_by_a_stuck_writer_fails_the_append_closed(
        short_store: AuditStore, other_session: psycopg.Connection) -> None:
    other_session.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
    error = _refused_while_held(lambda: _request(short_store, "during"))
    assert isinstance(error, AuditError)
    other_session.rollback()
    _request(short_store, "after")
    assert verify_chain(short_store).checked == 3


def test_a_worker_s_driver_store_fails_closed_on_a_locked_table_too(
        short_store: AuditStore, other_session: psycopg.Connection) -> None:
    driver = DriverStore(DriverPlan.from_json(driver_plan(short_store.engine).to_json()))
    try:
        _request(driver, "worker-before")
        other_session.execute("LOCK TABLE audit_entries IN ACCESS EXCLUSIVE MODE")
        error = _refused_while_held(lambda: _request(driver, "during"))
        assert isinstance(error, AuditError) and "lock timeout" in str(error)
        other_session.rollback()
        _request(driver, "worker-after")
    finally:
        driver.close()
    assert verify_chain(short_store).checked == 4


def test_the_url_s_own_options_are_kept_beside_the_lock_timeout(store_url: str) -> None:
    url = make_url(store_url).update_query_dict({"options": "-c application_name=govgate-probe"})
    engine = make_engine(url.render_as_string(hide_password=False), busy_timeout_s=2.5)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "2500ms"
            assert conn.exec_driver_sql("SHOW application_name").scalar() == "govgate-probe"
    finally:
        engine.dispose()


def test_a_migration_still_waits_for_another_process_s_migration_however_long(
        new_db_url: Callable[..., str]) -> None:
    empty = new_db_url()  # nothing migrated: migrate() takes the migration lock
    engine = make_engine(empty, busy_timeout_s=BUSY_S)
    with psycopg.connect(**_conninfo(empty)) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
        thread, outcome = _in_thread(lambda: migrate(engine))
        thread.join(BUSY_S * 5)  # well past the lock timeout of every other statement
        assert thread.is_alive() and not outcome, f"migrate gave up waiting: {outcome}"
        holder.rollback()  # the other process's migration is done
        thread.join(HANG_GUARD_S)
    try:
        assert not thread.is_alive() and outcome == {"value": None}
        store = AuditStore(engine)
        _request(store, "r1")
        assert verify_chain(store).ok
    finally:
        engine.dispose()


def _conninfo(url_text: str) -> dict[str, Any]:
    url = make_url(url_text)
    return {"host": url.host, "port": url.port, "user": url.username, "password": url.password,
            "dbname": url.database}


def test_readiness_names_a_lock_held_on_the_audit_table_and_nothing_once_it_is_gone(
        store: AuditStore, other_session: psycopg.Connection) -> None:
    def refusal() -> str | None:
        with store.engine.connect() as conn:
            return write_refusal(conn)

    assert refusal() is None
    other_session.execute("LOCK TABLE audit_entries IN SHARE MODE")  # a CREATE INDEX's lock: reads go on
    assert refusal() == "another session holds a lock on the audit table (appends wait for it, then fail)"
    other_session.rollback()
    assert refusal() is None
    _request(store, "r1")  # the probe's own lock went with its transaction
    assert verify_chain(store).ok


def test_a_writer_cut_off_inside_the_append_lock_loses_it_and_the_others_go_on(store_url: str) -> None:
    """Probe r1 F1: a replica cut off from PostgreSQL inside the append lock (its packets dropped, FINs too)
    left its session idle in transaction, holding the lock until TCP keepalive (~2 h): every other replica's
    and worker's append waited, then failed at the busy timeout. The server now ends such a session after
    :func:`append_idle_limit_s` (here 2 s, half the busy timeout), and the appends waiting go through."""
    busy_s = 4.0
    assert append_idle_limit_s(busy_s) == busy_s / 2
    cut_off = make_engine(store_url, busy_timeout_s=busy_s)
    store = AuditStore(make_engine(store_url, busy_timeout_s=busy_s))
    try:
        _request(store, "before")
        silent = cut_off.raw_connection()  # the writer that is cut off: takes the lock as every append does
        cursor = silent.cursor()
        for statement in lock_statements(cut_off):
            cursor.execute(statement)
        thread, outcome = _in_thread(lambda: _request(store, "during"))  # waits for the lock, then gets it
        thread.join(HANG_GUARD_S)
        assert not thread.is_alive() and "error" not in outcome, outcome
        with pytest.raises(psycopg.Error, match="idle-in-transaction timeout|connection is lost"):  # ended, lock too
            cursor.execute("SELECT 1")
        silent.invalidate()
        assert [e.request_id for e in store.iter_entries()][-2:] == ["before", "during"]
        assert verify_chain(store).ok
    finally:
        store.engine.dispose()
        cut_off.dispose()


def test_readiness_names_a_session_sitting_on_the_append_lock_and_nothing_once_it_is_gone(
        store: AuditStore, other_session: psycopg.Connection) -> None:
    """Probe r1 F1: a writer stopped inside the append lock held every append while ``/readyz`` said the
    database was fine (the probe looked only for table locks). It now names a session that has held the
    append lock idle for more than a second."""
    def refusal() -> str | None:
        with store.engine.connect() as conn:
            return write_refusal(conn)

    assert refusal() is None
    other_session.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
    deadline = time.monotonic() + HANG_GUARD_S
    while (said := refusal()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert said is not None and "has held the append lock" in said and "appends wait for it" in said, said
    other_session.rollback()
    assert refusal() is None
    _request(store, "r1")
    assert verify_chain(store).ok


def test_a_worker_starting_while_the_schema_s_version_table_is_locked_waits_for_it(
        store_url: str, other_session: psycopg.Connection) -> None:
    from workers.store_prep import migrate_when_writable

    engine = make_engine(store_url, busy_timeout_s=BUSY_S)
    try:
        other_session.execute("LOCK TABLE alembic_version_audit IN ACCESS EXCLUSIVE MODE")  # a long upgrade's
        thread, outcome = _in_thread(lambda: migrate_when_writable(engine))
        thread.join(BUSY_S * 5)  # past several lock timeouts
        assert thread.is_alive() and not outcome, f"the worker's start gave up: {outcome}"
        other_session.rollback()
        thread.join(HANG_GUARD_S)
        assert not thread.is_alive() and outcome == {"value": None}
    finally:
        engine.dispose()
