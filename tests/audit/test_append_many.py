"""``AuditStore.append_many``: many appends in one group commit, each with the outcome ``append`` would give it.

Both backends (``tests/audit/conftest.py``). The gateway's audit thread
(``gateway/requests/append_queue.py``) hands the store what its requests
queued this way; what is checked here is that a batch is exactly the appends
one at a time would have been: the same entries in the list's order, each
refusal its own, the chain whole, and other threads' appends beside it.
"""

from __future__ import annotations

import threading
import time

import pytest

from audit import AppendArgs, AuditEntry, AuditError, AuditStore, DuplicateTerminalError, InvalidEntryError, verify_chain
from audit.kinds import CHAIN_FORMAT_REQUEST_ID


def _args(kind: str, request_id: str, **body: object) -> AppendArgs:
    return AppendArgs(kind, request_id, "alice", "blue", "tiny", dict(body), "rev-1",
                      {"prompt": f"text of {request_id}"} if kind == "request" else None)


def test_each_append_gets_its_entry_or_its_own_refusal_in_order(store: AuditStore) -> None:
    store.append("request", "earlier", principal="p", team=None, model="m", body={}, policy_revision="r")
    store.append("completion", "earlier", principal="p", team=None, model="m", body={}, policy_revision="r")
    outcomes = store.append_many([
        _args("request", "r1", n=1),
        _args("no such kind", "r2"),
        _args("completion", "r1", n=2),
        _args("completion", "r1", n=3),        # a second terminal entry in the same batch
        _args("completion", "earlier", n=4),   # one already there before the batch
        _args("request", "r3", n=5),
    ])
    assert [type(o).__name__ for o in outcomes] == ["AuditEntry", "InvalidEntryError", "AuditEntry",
                                                      "DuplicateTerminalError", "DuplicateTerminalError",
                                                      "AuditEntry"]
    assert isinstance(outcomes[1], InvalidEntryError)
    assert isinstance(outcomes[3], DuplicateTerminalError) and isinstance(outcomes[4], DuplicateTerminalError)
    written = [o for o in outcomes if isinstance(o, AuditEntry)]
    assert [(e.kind, e.request_id, e.body["n"]) for e in written] == [
        ("request", "r1", 1), ("completion", "r1", 2), ("request", "r3", 5)]
    assert [e.seq for e in written] == sorted(e.seq for e in written)
    for entry in written:  # what the store returned is what it holds
        assert store.get(entry.seq) == entry
    assert written[0].payload is not None and written[0].payload["prompt"] == "text of r1"
    result = verify_chain(store)
    assert result.ok and result.checked == 6  # the boundary, two before, three in the batch


def test_an_empty_batch_writes_nothing(store: AuditStore) -> None:
    assert store.append_many([]) == []
    assert store.head() is None


def test_batches_and_single_appends_from_other_threads_share_one_chain(store: AuditStore) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def singles(name: str) -> None:
        try:
            start.wait()
            for i in range(15):
                store.append("request", f"{name}-{i}", principal="p", team=None, model="m", body={"i": i},
                             policy_revision="r")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def batches(name: str) -> None:
        try:
            start.wait()
            for b in range(5):
                outcomes = store.append_many([_args("request", f"{name}-{b}-{i}", i=i) for i in range(6)])
                assert all(isinstance(o, AuditEntry) for o in outcomes), outcomes
                assert [o.request_id for o in outcomes] == [f"{name}-{b}-{i}" for i in range(6)]
                seqs = [o.seq for o in outcomes]
                assert seqs == sorted(seqs)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=singles, args=("s1",)), threading.Thread(target=singles, args=("s2",)),
               threading.Thread(target=batches, args=("b1",)), threading.Thread(target=batches, args=("b2",))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    result = verify_chain(store)
    assert result.ok and result.checked == 1 + 2 * 15 + 2 * 5 * 6
    assert len({e.request_id for e in store.iter_entries()}) == result.checked


@pytest.mark.parametrize("backend", ["postgresql"])  # a server session to terminate
def test_a_batch_whose_session_is_lost_mid_transaction_fails_every_append_and_the_next_is_written(
        store_url: str) -> None:
    """PostgreSQL gone under the batch (its session terminated while it waits for the append lock; the
    writer's one retry on a new session then waits out the busy timeout behind the same lock): every append
    in it refused, none written, the chain whole; the next batch is written."""
    import psycopg
    from sqlalchemy.engine import make_url

    from audit import make_engine
    from audit.db import APPEND_LOCK_KEY

    store = AuditStore(make_engine(store_url, busy_timeout_s=2.0))
    store.append("request", "before", principal="p", team=None, model="m", body={}, policy_revision="r")
    url = make_url(store.engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
    outcomes: list[object] = []
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_KEY,))
        batch = threading.Thread(target=lambda: outcomes.extend(
            store.append_many([_args("request", f"r{i}", i=i) for i in range(5)])))
        batch.start()
        waiting: list[tuple[int]] = []
        for _ in range(2000):
            waiting = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                " AND query LIKE '%%pg_advisory_xact_lock%%'").fetchall()
            if waiting:
                break
            time.sleep(0.005)
        [(writer,)] = waiting
        admin.execute("SELECT pg_terminate_backend(%s)", (writer,))
        batch.join(60)
        admin.execute("SELECT pg_advisory_unlock_all()")
    assert not batch.is_alive()
    assert len(outcomes) == 5 and all(isinstance(o, AuditError) for o in outcomes), outcomes
    after = store.append("request", "after", principal="p", team=None, model="m", body={}, policy_revision="r")
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "before", "after"]
    assert after.seq == 3 and verify_chain(store).ok
    store.engine.dispose()
