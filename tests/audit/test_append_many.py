"""``AuditStore.append_many``: many appends in one group commit, each with the outcome ``append`` would give it.

Both backends (``tests/audit/conftest.py``). The gateway's audit thread
(``gateway/requests/append_queue.py``) hands the store what its requests
queued this way; what is checked here is that a batch is exactly the appends
one at a time would have been: the same entries in the list's order, each
refusal its own, the chain whole, and other threads' appends beside it.
"""

from __future__ import annotations

import threading

from audit import AppendArgs, AuditEntry, AuditStore, DuplicateTerminalError, InvalidEntryError, verify_chain


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
