"""The writer connection (audit/writer.py): one kept connection per engine, and what the pool used to do for the append.

Appends run on one long-lived driver connection per engine and process;
these tests hold it to the pool's duties (a lost connection replaced
without a failed append, nothing written twice, disposal, forks) and to the
store's promises (one unbroken chain from many threads, failures that leave
nothing recorded and the connection usable), on SQLite and on PostgreSQL;
lost connections, which only a server can make, in test_writer_postgres.py.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from audit import AuditError, AuditStore, DuplicateTerminalError, InvalidEntryError, verify_chain
from audit.chain import canonical_json
from audit.writer import writer_for
from tests.audit.conftest import RawDB
from tests.audit.queued_appends import QueuedAppends


def _append(store: AuditStore, kind: str, request_id: str, body: Any = None, **kwargs: Any) -> Any:
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body=body or {},
                        policy_revision="rev-1", **kwargs)


def _connection_of(store: AuditStore, backend: str, request_id: str, kind: str = "request") -> Any:
    """Append and say which connection it ran on (the PostgreSQL backend pid, or the sqlite3 connection)."""
    seen: list[Any] = []

    def look(cursor: Any) -> None:
        if backend == "postgresql":
            cursor.execute("SELECT pg_backend_pid()")
            seen.append(cursor.fetchone()[0])
        else:
            seen.append(cursor.connection)

    _append(store, kind, request_id, alongside=look)
    return seen[0]


def test_appends_reuse_one_connection_shared_by_the_stores_of_an_engine(store: AuditStore, backend: str) -> None:
    first = _connection_of(store, backend, "r1")
    assert _connection_of(store, backend, "r2") == first
    other = AuditStore(store.engine)  # the gateway's key store has its own AuditStore on the same engine
    assert _connection_of(other, backend, "r3") == first
    assert writer_for(store.engine) is writer_for(other.engine)
    assert store.engine.pool.checkedout() == 0  # the writer's connection is not held out of the pool
    assert verify_chain(store).checked == 4


def test_dispose_closes_the_connection_and_the_next_append_connects_anew(store: AuditStore, backend: str) -> None:
    first = _connection_of(store, backend, "r1")
    store.engine.dispose()
    if backend == "sqlite":
        with pytest.raises(Exception, match="closed"):
            first.execute("SELECT 1")
    second = _connection_of(store, backend, "r2")
    assert second != first
    assert verify_chain(store).ok and store.head().request_id == "r2"  # type: ignore[union-attr]


def test_failures_roll_back_and_leave_the_connection_usable(store: AuditStore, backend: str) -> None:
    first = _connection_of(store, backend, "r1", kind="completion")

    class Refused(Exception):
        pass

    def refuse(_cursor: Any) -> None:
        raise Refused

    with pytest.raises(Refused):
        _append(store, "request", "r2", alongside=refuse)
    with pytest.raises(DuplicateTerminalError):
        _append(store, "completion", "r1")
    with pytest.raises(InvalidEntryError):
        _append(store, "nonsense", "r3")
    assert _connection_of(store, backend, "r4") == first
    assert [e.request_id for e in store.iter_entries()] == ["chain-format-2", "r1", "r4"]
    assert verify_chain(store).ok


def test_an_append_inside_an_append_is_refused_not_deadlocked(store: AuditStore) -> None:
    def nested(_cursor: Any) -> None:
        _append(store, "request", "inner")

    with pytest.raises(RuntimeError, match="inside another append"):
        _append(store, "request", "outer", alongside=nested)
    assert store.head() is None  # the outer append rolled back too (nothing, not even the boundary)
    assert _append(store, "request", "after").seq == 2


def test_threads_appending_at_once_make_one_unbroken_chain(store: AuditStore) -> None:
    threads, per_thread = 8, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        try:
            for i in range(per_thread):
                _append(store, ("request", "completion")[i % 2], f"t{t}-{i // 2}", {"t": t, "i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == []
    entries = list(store.iter_entries())
    assert [e.seq for e in entries] == list(range(1, threads * per_thread + 2))
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(entries, entries[1:]))
    result = verify_chain(store)
    assert result.ok and result.checked == threads * per_thread + 1


def test_a_forked_child_forgets_the_parents_connection_without_closing_it(store: AuditStore, backend: str) -> None:
    """What ``os.register_at_fork`` runs in a child, run here without forking (tests spawn, never fork)."""
    first = _connection_of(store, backend, "r1")
    writer = writer_for(store.engine)
    writer._forget_after_fork()
    if backend == "sqlite":
        assert first.execute("SELECT count(*) FROM audit_entries").fetchone() == (2,)  # still open: not closed
    assert _connection_of(store, backend, "r2") != first
    assert verify_chain(store).ok


def test_a_thread_waits_for_the_writer_no_longer_than_for_the_database(
        store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _append(store, "request", "r1")
    writer = writer_for(store.engine)
    monkeypatch.setattr(writer, "_wait_s", 0.05)  # the engine's busy timeout (tests/audit/test_busy_timeout.py)
    assert writer._lock.acquire()  # another thread of this process holds the writer
    try:
        caught: list[BaseException] = []
        thread = threading.Thread(target=lambda: caught.append(pytest.raises(AuditError, _append, store,
                                                                             "request", "r2").value))
        thread.start()
        thread.join(30)
        assert len(caught) == 1 and "other audit appends" in str(caught[0])
    finally:
        writer._lock.release()
    assert _append(store, "request", "r3").seq == 3


@pytest.mark.parametrize("body", [
    {1: "a", 2: "b"},  # non-string keys that sort as their strings do
    {2: "b", 10: "a"},  # and that do not
    {"t": (1, 2), "n": None},  # a tuple reads back as a list
    {"nested": {None: [1.5, {3: 4}]}, "flags": [{True: 0}]},
    {"s": "é\u2028\x00", "f": 1e16, "i": 2**70},
])
def test_what_is_stored_is_the_canonical_json_of_what_reads_back(store: AuditStore, raw: RawDB,
                                                                 body: dict[Any, Any]) -> None:
    entry = _append(store, "request", "r1", body)
    [(stored,)] = raw.rows("SELECT CAST(body AS TEXT) FROM audit_entries WHERE seq = 2")
    assert stored.encode("utf-8") == canonical_json(entry.body)
    assert store.get(2) == entry and verify_chain(store).ok


# -- group commit: threads that append while a transaction runs share the next one ----------


def test_appends_queued_behind_a_transaction_commit_together_and_fail_alone(store: AuditStore) -> None:
    _append(store, "completion", "done-before")

    class Refused(Exception):
        pass

    def refuse(_cursor: Any) -> None:
        raise Refused

    with QueuedAppends(store, _append, leader=("request", "r0")) as batched:  # a transaction is running
        batched.add("a", "request", "r1")
        batched.add("duplicate", "completion", "done-before")  # refused by the database
        batched.add("refused", "request", "r2", alongside=refuse)  # refused by its alongside
        batched.add("b", "completion", "r1")

    results = batched.results
    assert isinstance(results["duplicate"], DuplicateTerminalError)
    assert isinstance(results["refused"], Refused)
    a, b, leader = results["a"], results["b"], results["leader"]
    assert (leader.seq, a.seq, b.seq) == (3, 4, 5)  # the refused ones took no place on the chain
    assert a.created_at == b.created_at != leader.created_at  # one transaction for the four queued
    entries = list(store.iter_entries())
    assert [e.request_id for e in entries] == ["chain-format-2", "done-before", "r0", "r1", "r1"]
    assert entries[3] == a and entries[4] == b
    assert verify_chain(store).ok


def test_a_batch_whose_transaction_fails_records_none_of_it(store: AuditStore) -> None:
    """An interrupt (not an error one entry can be refused for) in an alongside rolls the whole batch back."""
    _append(store, "request", "r0")

    class Interrupt(BaseException):
        pass

    def interrupt(_cursor: Any) -> None:
        raise Interrupt

    with QueuedAppends(store, _append, leader=("request", "r1")) as batched:
        batched.add("first", "request", "q0")  # inserted before the interrupt: rolled back with it
        batched.add("interrupted", "request", "q1", alongside=interrupt)
        batched.add("last", "request", "q2")
    results = batched.results
    # The batch ran on the thread of its first entry: the interrupt is raised there, where it happened.
    assert isinstance(results["first"], Interrupt)
    for name in ("interrupted", "last"):
        assert isinstance(results[name], AuditError) and "abandoned" in str(results[name])
    assert [e.request_id for e in store.iter_entries()] == ["chain-format-2", "r0", "r1"]
    assert _append(store, "request", "after").seq == 4 and verify_chain(store).ok
