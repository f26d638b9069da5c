"""What a group commit runs: a statement per entry, no savepoint, unless an entry is refused.

A batch of several entries (``AuditStore.append_many``, threads queued
behind a running transaction) used to put every entry on its own savepoint:
three statements each, round trips on PostgreSQL, and a subtransaction each
there, past 64 of which every session's snapshots overflow
(docs/architecture.md, "Group commit"). Now a batch is written a statement
an entry; when one entry is refused, it keeps its refusal, that transaction
is rolled back and the others are written again, each on its own savepoint,
from the head as it then is. A connection lost under the batch is not
retried.

Both backends. The statements are seen on the cursor the appender is handed
(a spy around the real driver cursor, one list per transaction the writer
runs); on PostgreSQL also in the rows' ``xmin``: rows written under
savepoints each carry their subtransaction's id.
"""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from audit import AppendArgs, AuditEntry, AuditError, AuditStore, DuplicateTerminalError, make_engine, verify_chain
from audit.db import APPEND_LOCK_KEY
from audit.kinds import CHAIN_FORMAT_REQUEST_ID
from audit.writer import writer_for
from tests.audit.conftest import RawDB
from tests.audit.queued_appends import QueuedAppends


def _psycopg_url(store_url: str) -> str:
    return make_url(store_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _args(kind: str, request_id: str, **body: object) -> AppendArgs:
    return AppendArgs(kind, request_id, "alice", "blue", "tiny", dict(body), "rev-1", None)


def _append(store: AuditStore, kind: str, request_id: str, **kwargs: Any) -> AuditEntry:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body={},
                        policy_revision="rev-1", **kwargs)


class _Spy:
    """The driver's cursor, with every statement it is asked to run written down."""

    def __init__(self, cursor: Any, log: list[str]) -> None:
        self._cursor = cursor
        self._log = log

    def execute(self, sql: str, *args: Any) -> Any:
        self._log.append(sql)
        return self._cursor.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Transactions:
    """Each transaction the store's writer connection runs: its lock statements, then what its work ran."""

    def __init__(self, store: AuditStore, monkeypatch: pytest.MonkeyPatch,
                 before: Callable[[int], None] | None = None) -> None:
        self.runs: list[list[str]] = []
        writer = writer_for(store.engine)
        real = writer.run

        def run(begin: tuple[str, ...], work: Callable[[Any], Any], since: float | None = None) -> Any:
            if before is not None:
                before(len(self.runs))
            log = list(begin)
            self.runs.append(log)
            return real(begin, lambda cursor: work(_Spy(cursor, log)), since)

        monkeypatch.setattr(writer, "run", run)

    @staticmethod
    def count(statements: list[str], first_word: str) -> int:
        return sum(1 for sql in statements if sql.split(None, 1)[0].upper() == first_word)


def _queued(store: AuditStore) -> QueuedAppends:
    return QueuedAppends(store, _append)


def test_a_batch_is_written_a_statement_an_entry_without_a_savepoint(
        store: AuditStore, backend: str, raw: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    _append(store, "request", "before")
    transactions = _Transactions(store, monkeypatch)
    outcomes = store.append_many([_args("request", f"r{i}", i=i) for i in range(100)])
    assert all(isinstance(o, AuditEntry) for o in outcomes), outcomes
    assert [o.seq for o in outcomes] == list(range(3, 103))  # type: ignore[union-attr]
    [statements] = transactions.runs  # one transaction
    for word in ("SAVEPOINT", "RELEASE", "ROLLBACK"):
        assert _Transactions.count(statements, word) == 0, statements[:8]
    assert _Transactions.count(statements, "INSERT") == 100
    if backend == "postgresql":  # the server's own view: every row of the batch has the transaction's own id
        [(xids,)] = raw.rows("SELECT count(DISTINCT xmin::text) FROM audit_entries WHERE seq >= 3")
        assert xids == 1
    result = verify_chain(store)
    assert result.ok and result.checked == 102


def test_a_refused_entry_in_the_middle_fails_alone_and_the_batch_is_written_again_on_savepoints(
        store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _append(store, "request", "done")
    _append(store, "completion", "done")
    transactions = _Transactions(store, monkeypatch)
    appends = [_args("request", f"r{i}", i=i) for i in range(40)]
    appends[20] = _args("completion", "done", i=20)  # the request already has its terminal entry
    outcomes = store.append_many(appends)

    refused = outcomes[20]
    assert isinstance(refused, DuplicateTerminalError)  # as before: the driver's error, as SQLAlchemy wraps it
    assert isinstance(refused.__cause__, IntegrityError)
    written = [o for i, o in enumerate(outcomes) if i != 20]
    assert all(isinstance(o, AuditEntry) for o in written), written
    assert [o.request_id for o in written] == [f"r{i}" for i in range(40) if i != 20]  # type: ignore[union-attr]
    assert [o.seq for o in written] == list(range(4, 43))  # type: ignore[union-attr]  # in order, no gap
    for entry in written:
        assert store.get(entry.seq) == entry  # type: ignore[union-attr]
    optimistic, careful = transactions.runs  # rolled back at the refusal, then written again
    assert _Transactions.count(optimistic, "SAVEPOINT") == 0
    assert _Transactions.count(optimistic, "INSERT") == 21  # up to the refused one
    assert _Transactions.count(careful, "SAVEPOINT") == 39  # the others; the refused one is not tried again
    assert _Transactions.count(careful, "INSERT") == 39
    result = verify_chain(store)
    assert result.ok and result.checked == 42


def test_the_batch_written_again_is_chained_from_the_head_as_it_then_is(
        store: AuditStore, raw: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the rolled-back transaction and the next, another process appends: the batch goes after it."""
    _append(store, "request", "done")
    _append(store, "completion", "done")
    other = raw.store()  # an engine of its own: another process's writer connection
    slipped: list[AuditEntry] = []

    def between(runs_before: int) -> None:
        if runs_before == 1:
            slipped.append(_append(other, "request", "slipped in"))

    transactions = _Transactions(store, monkeypatch, before=between)
    outcomes = store.append_many([_args("request", "a"), _args("completion", "done"), _args("request", "b")])
    assert len(transactions.runs) == 2
    a, duplicate, b = outcomes
    assert isinstance(duplicate, DuplicateTerminalError)
    assert isinstance(a, AuditEntry) and isinstance(b, AuditEntry)
    [other_entry] = slipped
    assert (other_entry.seq, a.seq, b.seq) == (4, 5, 6)
    assert a.prev_hash == other_entry.hash and b.prev_hash == a.hash
    assert a.created_at >= other_entry.created_at
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "done", "done", "slipped in",
                                                            "a", "b"]
    assert verify_chain(store).ok


def test_an_alongside_refusal_in_a_batch_fails_that_entry_alone_and_what_it_wrote_is_rolled_back(
        store: AuditStore, raw: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    raw.execute("CREATE TABLE side_effects (name TEXT NOT NULL)")
    _append(store, "request", "before")

    class Refused(Exception):
        pass

    calls: list[str] = []

    def write(name: str, refuse: bool = False) -> Callable[[Any], None]:
        def alongside(cursor: Any) -> None:
            calls.append(name)
            cursor.execute(f"INSERT INTO side_effects (name) VALUES ('{name}')")
            if refuse:
                raise Refused(name)
        return alongside

    transactions = _Transactions(store, monkeypatch)
    with _queued(store) as queued:
        queued.add("a", "request", "a", alongside=write("a"))
        queued.add("refused", "request", "refused", alongside=write("refused", refuse=True))
        queued.add("b", "request", "b")
        queued.add("c", "completion", "a", alongside=write("c"))
    results = queued.results
    assert isinstance(results["refused"], Refused)  # the alongside's own exception, unchanged
    leader, a, b, c = (results[name] for name in ("leader", "a", "b", "c"))
    assert (leader.seq, a.seq, b.seq, c.seq) == (3, 4, 5, 6)
    assert a.created_at == b.created_at == c.created_at  # one transaction for the queued four
    # "a" ran in the rolled-back transaction too, "refused" only there: what stays is what the second wrote.
    assert calls == ["a", "refused", "a", "c"]
    assert sorted(name for (name,) in raw.rows("SELECT name FROM side_effects")) == ["a", "c"]
    _leader_run, optimistic, careful = transactions.runs
    assert _Transactions.count(optimistic, "SAVEPOINT") == 0
    assert _Transactions.count(careful, "SAVEPOINT") == 3
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "before", "leader", "a", "b",
                                                            "a"]
    assert verify_chain(store).ok


def test_an_entry_the_database_fails_in_the_middle_of_a_batch_fails_alone_and_is_not_tried_again(
        store_url: str, backend: str, raw: RawDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: the entry's statement waits for a lock past ``lock_timeout`` (tried again, it would wait
    again); SQLite: its statement is interrupted, which rolls SQLite's whole transaction back."""
    store = AuditStore(make_engine(store_url, busy_timeout_s=2.0))  # the leader waits for the writer meanwhile
    raw.execute("CREATE TABLE side_effects (name TEXT)")
    _append(store, "request", "before")
    calls: list[str] = []
    locker: Any = None
    if backend == "postgresql":
        locker = psycopg.connect(_psycopg_url(store_url))  # its transaction holds the table until closed
        locker.execute("LOCK TABLE side_effects IN ACCESS EXCLUSIVE MODE")

        def failing(cursor: Any) -> None:
            calls.append("failing")
            cursor.execute("INSERT INTO side_effects (name) VALUES ('waits')")
    else:
        def failing(cursor: Any) -> None:
            calls.append("failing")
            connection = cursor.connection
            connection.create_function("interrupt_here", 0, connection.interrupt)
            cursor.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)"
                           " INSERT INTO side_effects (name) SELECT interrupt_here() FROM n")

    transactions = _Transactions(store, monkeypatch)
    try:
        with _queued(store) as queued:
            queued.add("a", "request", "a")
            queued.add("failing", "request", "failing", alongside=failing)
            queued.add("b", "request", "b")
    finally:
        if locker is not None:
            locker.close()
    results = queued.results
    assert isinstance(results["failing"], AuditError), results["failing"]
    assert calls == ["failing"]
    leader, a, b = (results[name] for name in ("leader", "a", "b"))
    assert (leader.seq, a.seq, b.seq) == (3, 4, 5)
    _leader_run, optimistic, careful = transactions.runs
    assert _Transactions.count(optimistic, "SAVEPOINT") == 0
    assert _Transactions.count(careful, "SAVEPOINT") == 2
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "before", "leader", "a", "b"]
    assert verify_chain(store).ok
    store.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])  # a server session to end
def test_a_connection_lost_in_the_middle_of_a_batch_fails_every_entry_and_is_not_retried(
        store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an entry's refusal: writing the others again would reconnect and wait for the server again."""
    _append(store, "request", "before")
    calls: list[str] = []

    def ends_its_session(cursor: Any) -> None:
        calls.append("ends")
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    transactions = _Transactions(store, monkeypatch)
    with _queued(store) as queued:
        queued.add("a", "request", "a")
        queued.add("ends", "request", "ends", alongside=ends_its_session)
        queued.add("b", "request", "b")
    results = queued.results
    assert isinstance(results["leader"], AuditEntry)
    for name in ("a", "ends", "b"):
        assert isinstance(results[name], AuditError), results[name]
    assert calls == ["ends"]
    assert len(transactions.runs) == 2  # the leader's, then the batch's once
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "before", "leader"]
    assert _append(store, "request", "after").seq == 4 and verify_chain(store).ok


def test_a_batch_behind_a_locked_database_fails_every_entry_in_one_transaction(
        store_url: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AuditStore(make_engine(store_url, busy_timeout_s=0.3))
    _append(store, "request", "before")
    transactions = _Transactions(store, monkeypatch)
    if backend == "postgresql":
        locker: Any = psycopg.connect(_psycopg_url(store_url), autocommit=True)
        locker.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_KEY,))
    else:
        import sqlite3

        locker = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
    try:
        outcomes = store.append_many([_args("request", f"r{i}") for i in range(5)])
    finally:
        locker.close()
    assert all(isinstance(o, AuditError) for o in outcomes), outcomes
    assert len(transactions.runs) == 1
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "before"]
    store.engine.dispose()
