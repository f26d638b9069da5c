"""What is particular to the audit store on PostgreSQL, on a real server (tests/postgres_server.py).

The store's behaviour on both backends is tested by the parametrised tests
beside this file; these are the PostgreSQL-only cases: the connection
settings :func:`audit.db.make_engine` insists on, JSON text preservation,
the guards a superuser can and cannot get past, and failing closed when the
server is unreachable, refuses a role, or drops connections.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, text

from audit import AuditError, AuditStore, make_engine, migrate, verify_chain
from audit.chain import canonical_json
from govgate.processes import free_port
from tests.audit.conftest import RawDB
from tests.child_processes import CHILDREN
from tests.postgres_server import PostgresServer

JOIN_TIMEOUT_S = 120


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


def _append(store: AuditStore, kind: str, request_id: str, body: dict[str, Any] | None = None) -> Any:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body=body or {},
                        policy_revision="rev-1")


def _append_many(url: str, worker: int, count: int, barrier: Any) -> None:
    store = AuditStore(make_engine(url))
    barrier.wait()
    for i in range(count):
        store.append(("request", "completion")[i % 2], f"w{worker}-{i // 2}", principal=f"p{worker}", team="t",
                     model="m", body={"i": i}, policy_revision="1")
    store.engine.dispose()


def test_appends_stay_one_chain_when_the_database_defaults_to_serializable(
        store_url: str, store: AuditStore, raw: RawDB) -> None:
    """The append reads the head after the advisory lock: only READ COMMITTED sees the writer it waited for."""
    name = store_url.rsplit("/", 1)[1]
    raw.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation = \'serializable\'')
    with create_engine(store_url).connect() as conn:  # what a plain engine gets now
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "serializable"
    connection = make_engine(store_url).raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SHOW transaction_isolation")
        assert cursor.fetchone()[0] == "read committed"
    finally:
        connection.close()
    seen: list[str] = []  # the writer's session, opened beside the pool, is set up the same way
    store.append("request", "isolation", principal="p", team="t", model="m", body={}, policy_revision="1",
                 alongside=lambda cursor: (cursor.execute("SHOW transaction_isolation"),
                                           seen.append(cursor.fetchone()[0])))
    assert seen == ["read committed"]

    workers, per_worker = 4, 40
    barrier = CHILDREN.Barrier(workers)
    processes = [CHILDREN.Process(target=_append_many, args=(store_url, w, per_worker, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [p.exitcode for p in processes] == [0] * workers
    entries = list(store.iter_entries())
    total = workers * per_worker + 2  # the chain_format boundary (written by whichever came first), "isolation"
    assert [e.seq for e in entries] == list(range(1, total + 1)) and entries[0].kind == "chain_format"
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(entries, entries[1:]))
    result = verify_chain(store)
    assert result.ok and result.checked == total


def test_a_url_without_a_driver_means_psycopg_3(store_url: str) -> None:
    plain = store_url.replace("postgresql+psycopg://", "postgresql://")
    engine = make_engine(plain)
    assert engine.dialect.driver == "psycopg"
    assert _append(AuditStore(engine), "request", "r1").seq == 2  # after the chain_format boundary
    engine.dispose()


def test_the_body_column_is_json_and_keeps_the_text_verbatim(store: AuditStore, raw: RawDB) -> None:
    """``json`` (not ``jsonb``) stores its input as given: what is hashed is what is stored, NUL escapes too."""
    body = {"z": [1.5, 1e300, -0.0], "a": "nul \u0000 here, é ✓", "big": 2**70}
    entry = _append(store, "request", "r1", body)
    [(column_type,)] = raw.rows("SELECT data_type FROM information_schema.columns "
                                "WHERE table_name = 'audit_entries' AND column_name = 'body'")
    assert column_type == "json"
    [_, (_, _, stored, _, _)] = raw.stored_rows()  # after the chain_format boundary
    assert stored.encode("utf-8") == canonical_json(body)
    assert store.get(2) == entry and entry.body["a"] == "nul \u0000 here, é ✓" and verify_chain(store).ok
    # jsonb would have kept only the last of two equal keys and reordered them; json keeps both, as written.
    [(kept, normalised)] = raw.rows("SELECT CAST(CAST(:doc AS json) AS text), CAST(CAST(:doc AS jsonb) AS text)",
                                    {"doc": '{"b":1,"a":2,"a":3}'})
    assert (kept, normalised) == ('{"b":1,"a":2,"a":3}', '{"a": 3, "b": 1}')


def test_a_superuser_can_switch_the_guards_off_but_not_slip_past_them(store: AuditStore, raw: RawDB) -> None:
    """UPDATE, DELETE and TRUNCATE are refused while the triggers stand; ``ON CONFLICT DO UPDATE`` is an UPDATE."""
    first = _append(store, "request", "r1", {"prompt": "hi"})
    for statement in ("UPDATE audit_entries SET team = 'red'", "DELETE FROM audit_entries", "TRUNCATE audit_entries",
                      "INSERT INTO audit_entries SELECT * FROM audit_entries ON CONFLICT (seq) DO UPDATE SET team = 'x'"):
        with pytest.raises(Exception, match="append-only"):
            raw.execute(statement)
    assert store.get(2) == first and verify_chain(store).ok


def test_non_utf8_database_is_refused_by_migrate(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url("postgres").replace("postgresql+psycopg", "postgresql"),
                         autocommit=True) as conn:
        conn.execute("CREATE DATABASE ascii_audit ENCODING 'SQL_ASCII' TEMPLATE template0")
    url = postgres_server.url("ascii_audit")
    engine = make_engine(url)
    try:
        with pytest.raises(AuditError, match="UTF8"):
            migrate(engine)
    finally:
        engine.dispose()
        postgres_server.drop_database(url)


def test_unreachable_server_fails_closed() -> None:
    engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/audit")
    store = AuditStore(engine)
    for attempt in (lambda: migrate(engine), lambda: _append(store, "request", "r1"),
                    lambda: store.terminal_for("r1"), store.tail):
        with pytest.raises(AuditError) as caught:
            attempt()
        assert "127.0.0.1" in str(caught.value) and caught.value.__cause__ is not None


@pytest.fixture
def reader_url(store_url: str, raw: RawDB) -> Iterator[str]:
    """The store's database as a role that may read the audit table and nothing more."""
    role = f"reader_{store_url.rsplit('_', 1)[1]}"
    raw.execute(f"CREATE ROLE {role} LOGIN")
    raw.execute(f"GRANT SELECT ON audit_entries TO {role}")
    yield store_url.replace("://govgate@", f"://{role}@")
    raw.execute(f"DROP OWNED BY {role}")
    raw.execute(f"DROP ROLE {role}")


def test_a_role_that_may_only_read_gets_reads_and_clean_append_errors(store: AuditStore, reader_url: str) -> None:
    entry = _append(store, "completion", "r1", {"output": "x"})
    reader = AuditStore(make_engine(reader_url))
    try:
        assert reader.tail(1) == [entry] and reader.terminal_for("r1") == entry and verify_chain(reader).ok
        with pytest.raises(AuditError, match="permission denied") as caught:
            _append(reader, "request", "r2")
        assert caught.value.__cause__ is not None
    finally:
        reader.engine.dispose()
    assert store.head() == entry


def test_connections_killed_by_the_server_are_replaced(store: AuditStore, raw: RawDB) -> None:
    """After a server restart or an admin's pg_terminate_backend, the next append works (pool pre-ping)."""
    _append(store, "request", "r1")
    assert store.terminal_for("r1") is None  # both paths now hold a pooled connection
    [(killed,)] = raw.rows("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert killed >= 1
    done = _append(store, "completion", "r1", {"output": "x"})
    assert store.terminal_for("r1") == done and verify_chain(store).checked == 3  # with the boundary


def test_a_connection_whose_socket_failed_under_the_driver_is_replaced(store: AuditStore) -> None:
    """psycopg reports a socket that failed before libpq saw the session end as "connection socket closed",
    with the connection not yet ``broken`` (so SQLAlchemy's disconnect test says no): seen once in the suite
    on the first append after ``pg_terminate_backend``, the backend's exit racing the next query, and that
    append failed. It is a lost connection all the same: replaced before the first statement, the append
    written. Made here by closing the kept connection's descriptor under the driver."""
    from audit.kept_connection import _KEPT

    _append(store, "request", "r1")
    before = verify_chain(store).checked
    [writer] = [kept for kept in list(_KEPT) if getattr(kept, "_engine", lambda: None)() is store.engine]
    os.close(writer._conn.fileno())  # the driver's socket gone; psycopg and libpq not told
    done = _append(store, "completion", "r1", {"output": "x"})
    assert done.kind == "completion" and store.terminal_for("r1") is not None
    verified = verify_chain(store)
    assert verified.ok and verified.checked == before + 1


def test_a_pooled_session_whose_socket_failed_under_the_driver_is_replaced(store: AuditStore) -> None:
    """The same failed socket under a pooled session (the reads: ``terminal_for``, the console's pages): its
    pre-ping's "connection socket closed" is a disconnect, so the pool replaces the session and the read is
    answered, rather than failing (and failing again on the next checkout of the same session)."""
    _append(store, "completion", "r1", {"output": "x"})
    assert store.terminal_for("r1") is not None  # the pool now holds a session, idle
    with store.engine.connect() as connection:
        fd = connection.connection.dbapi_connection.fileno()
    os.close(fd)  # the pooled session's socket gone; psycopg and libpq not told
    assert store.terminal_for("r1") is not None
    assert store.terminal_for("r1") is not None
