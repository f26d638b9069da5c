"""A PostgreSQL session that stops answering (frozen server, partition): the append fails closed, not forever.

The server's kernel still ACKs a frozen backend's TCP segments, so neither
keepalives nor ``lock_timeout`` end the wait; :mod:`audit.stall_watch` cuts
the socket once the transaction has had no answer for the busy timeout (plus
its grace). Freezing only the writer's own backend (SIGSTOP on its pid) is
the frozen server as that connection sees it, without stopping the
session's shared server for the other tests; the next append connects anew
(a new backend) and the chain goes on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Iterator

import pytest

from audit import AuditEntry, AuditError, AuditStore, make_engine, stall_watch, verify_chain
from tests.audit.test_writer import _append, _connection_of

#: Short, so the test does not wait long for the bound (its exact length is never asserted).
BUSY_S = 0.5
#: Only a guard against hanging the suite when the bound is missing: far beyond it.
HANG_GUARD_S = 60.0


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


@pytest.fixture
def short_store(store_url: str) -> Iterator[AuditStore]:
    store = AuditStore(make_engine(store_url, busy_timeout_s=BUSY_S))
    yield store
    store.engine.dispose()


def _in_thread(call: Any) -> list[Any]:
    """Run ``call`` in a thread, wait for it under the hang guard; its result or exception, as a list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the append waited on a frozen server without end"
    return outcome


def _until_accepted(call: Any) -> Any:
    """``call``'s result once the store accepts it (refusals retried under the hang guard)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return call()
        except AuditError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_session_frozen_between_appends_is_cut_and_the_append_runs_on_a_new_one(
        short_store: AuditStore) -> None:
    frozen = _connection_of(short_store, "postgresql", "r1")
    os.kill(frozen, signal.SIGSTOP)
    try:
        # Nothing ran on the frozen session (its BEGIN got no answer): tried once more on a new session.
        [again] = _in_thread(lambda: _connection_of(short_store, "postgresql", "r1", kind="completion"))
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert isinstance(again, int) and again != frozen, again
    assert [e.kind for e in short_store.iter_entries()] == ["chain_format", "request", "completion"]
    assert verify_chain(short_store).ok


def test_a_session_frozen_inside_an_append_fails_it_closed_and_the_next_append_connects_anew(
        short_store: AuditStore) -> None:
    _append(short_store, "request", "r1")
    frozen: list[int] = []

    def freeze_then_ask(cursor: Any) -> None:
        cursor.execute("SELECT pg_backend_pid()")
        frozen.append(cursor.fetchone()[0])
        os.kill(frozen[0], signal.SIGSTOP)
        cursor.execute("SELECT 1")  # no answer: the server is frozen as this session sees it

    try:
        [outcome] = _in_thread(lambda: _append(short_store, "completion", "r1", alongside=freeze_then_ask))
        assert isinstance(outcome, AuditError), outcome
        # The frozen session still holds the write lock: appends are refused (bounded), not held.
        [meanwhile] = _in_thread(lambda: _append(short_store, "request", "r2"))
        assert isinstance(meanwhile, AuditError), meanwhile
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # Answering again, the old session finds its socket shut and ends; the store recovers by itself on a new one.
    again = _until_accepted(lambda: _connection_of(short_store, "postgresql", "r2"))
    assert again != frozen[0]
    assert short_store.terminal_for("r1") is None  # the refused append wrote nothing
    done = _append(short_store, "completion", "r1")  # the terminal, written again: exactly one
    assert short_store.terminal_for("r1") == done
    assert [(e.kind, e.request_id) for e in short_store.iter_entries()][1:] == [
        ("request", "r1"), ("request", "r2"), ("completion", "r1")]
    assert verify_chain(short_store).ok


def test_a_batch_longer_than_the_bound_whose_server_answers_every_statement_is_written(store_url: str) -> None:
    """The bound is for a server that stops answering, not for a long batch it answers statement by statement.

    The gateway's audit thread hands the store up to 256 appends at once
    (``gateway/requests/append_queue.py``), three round trips each; over a
    link of a few milliseconds that transaction outlasts the busy timeout
    plus its grace. It was cut, failing every append in it, and the next
    batch (the backlog, as large) the same way: under load no append was
    written again.
    """
    from sqlalchemy.engine import make_url

    from audit import AppendArgs
    from tests.loopback_proxy import LoopbackProxy

    url = make_url(store_url)
    bound_s = BUSY_S + stall_watch.GRACE_S
    proxy = LoopbackProxy(url.host or "127.0.0.1", url.port or 5432, delay_s=0.004)
    store = AuditStore(make_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
                                   busy_timeout_s=BUSY_S))
    try:
        _append(store, "request", "first")  # connected: the batch below is the transaction's whole time
        count = int(bound_s / (3 * proxy.delay_s)) + 50  # three round trips an entry: past the bound in all
        batch = [AppendArgs("request", f"r{i}", "p", None, "m", {"i": i}, "rev") for i in range(count)]
        [outcomes] = _in_thread(lambda: store.append_many(batch))
        refused = [o for o in outcomes if not isinstance(o, AuditEntry)]
        assert not refused, refused[:1]
        assert verify_chain(store).checked == count + 2
    finally:
        store.engine.dispose()
        proxy.close()
