"""The audit's commits are on the PostgreSQL server's disk before a request goes on, whatever ``synchronous_commit`` says.

A server, database or role tuned with ``synchronous_commit = off`` acknowledges
a commit before its WAL is written; an immediate shutdown, a killed
postmaster or a power cut then lost the last entries: requests served with
no ``request`` entry and outputs with no terminal entry, under a chain that
still verified (the lost entries were its tail). Found by restarting the
test server (``synchronous_commit=off`` for speed) under load: a ``failed``
entry for a request whose ``request`` entry was gone. The store's sessions
now commit ``local`` where they would commit ``off``
(:mod:`audit.postgresql_setup`), and keep any other setting.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from audit import AuditStore, make_engine, migrate, verify_chain
from audit.append_plan import driver_plan
from audit.driver_plan import DriverPlan
from audit.driver_store import DriverStore
from tests.audit.conftest import RawDB
from tests.postgres_server import PostgresServer, PostgresUnavailable


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


def _append(store: AuditStore | DriverStore, kind: str, request_id: str, **extra: Any) -> Any:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body={},
                        policy_revision="rev-1", **extra)


def _settings_seen(url: str) -> dict[str, str]:
    """``synchronous_commit`` as each of the store's ways to the database has it: pool, writer, driver store."""
    store = AuditStore(make_engine(url))
    driver = DriverStore(DriverPlan.from_json(driver_plan(store.engine).to_json()))
    seen: dict[str, str] = {}
    try:
        with store.engine.connect() as conn:
            seen["pool"] = conn.exec_driver_sql("SHOW synchronous_commit").scalar()

        def look(cursor: Any) -> None:
            cursor.execute("SHOW synchronous_commit")
            seen["writer"] = cursor.fetchone()[0]

        _append(store, "request", "r1", alongside=look)
        [(seen["driver"],)] = driver._connection.run((), lambda c: c.execute("SHOW synchronous_commit").fetchall())
    finally:
        driver.close()
        store.engine.dispose()
    return seen


def test_sessions_that_would_commit_asynchronously_commit_locally_and_other_settings_are_kept(
        store_url: str, raw: RawDB) -> None:
    name = store_url.rsplit("/", 1)[1]
    raw.execute(f"ALTER DATABASE \"{name}\" SET synchronous_commit = 'off'")
    assert _settings_seen(store_url) == {"pool": "local", "writer": "local", "driver": "local"}
    raw.execute(f"ALTER DATABASE \"{name}\" SET synchronous_commit = 'remote_apply'")  # the operator's choice
    assert _settings_seen(store_url) == {"pool": "remote_apply", "writer": "remote_apply", "driver": "remote_apply"}


@pytest.fixture
def lazy_wal_server() -> Iterator[PostgresServer]:
    """A server that commits asynchronously and writes the WAL of such commits only every 10 s."""
    try:
        server = PostgresServer.start("synchronous_commit=off", "wal_writer_delay=10000")
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))  # the session fixture already fails in CI when there is none
    yield server
    server.stop()


def test_entries_whose_append_returned_survive_a_crash_of_the_server(lazy_wal_server: PostgresServer) -> None:
    url = lazy_wal_server.fresh_database("durable")
    store = AuditStore(make_engine(url))
    migrate(store.engine)
    with store.engine.connect() as conn:  # the schema on disk, whatever the migration's commit did
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CHECKPOINT")
    driver = DriverStore(DriverPlan.from_json(driver_plan(store.engine).to_json()))
    try:
        _append(store, "request", "r1")  # the gateway's request entry
        _append(driver, "completion", "r1")  # a worker's terminal entry
        lazy_wal_server.crash()  # before the WAL writer's next round
        lazy_wal_server.resume()
        entries = [(e.kind, e.request_id) for e in store.iter_entries()]
    finally:
        driver.close()
        store.engine.dispose()
    assert entries[1:] == [("request", "r1"), ("completion", "r1")]
    check = AuditStore(make_engine(url))
    try:
        assert verify_chain(check).checked == 3
    finally:
        check.engine.dispose()
