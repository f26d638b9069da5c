"""The engine's pooled PostgreSQL sessions: a wait the server does not answer is cut, a patient one is not.

:mod:`audit.answer_watch` bounds each wait on a pooled session (a statement,
the pool's pre-ping) at the busy timeout plus its grace, unless the server,
asked on a connection of its own, says the session's statement is still
running. ``pg_sleep`` is such a slow statement; SIGSTOP on one pooled
session's backend is the frozen server as that session sees it, without
stopping the session's shared server for the other tests; a whole server
frozen (every process SIGSTOPped) is a server of the test's own
(``own_postgres``; tests/e2e/test_postgres_frozen.py freezes one under a
served gateway). The bounds' lengths are never asserted, only that a wait
ends and how.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from audit import AuditError, AuditStore, make_engine, stall_watch
from audit.db import MIGRATE_LOCK_KEY, locked_transaction
from tests.e2e.test_postgres_frozen import server_pids
from tests.postgres_server import PostgresServer, own_postgres  # noqa: F401 - fixture
# PostgreSQL only, and a store whose busy timeout is BUSY_S: the same fixtures as the kept connection's tests.
from tests.audit.test_postgres_stall import BUSY_S, HANG_GUARD_S, _in_thread, backend, short_store  # noqa: F401 - fixtures
from tests.loopback_proxy import LoopbackProxy
from tests.audit.test_writer import _append, _connection_of

#: Longer than the bound (the busy timeout plus the watchdog's grace).
PAST_THE_BOUND_S = BUSY_S + stall_watch.GRACE_S + 1.5
#: A statement a test expects cut: far longer than the bound and the probe's wait, so that a watchdog late on
#: a busy machine (a CPU burner beside the suite) still cuts it before it ends on its own; the cut comes at
#: the bound, so the test takes no longer.
CUT_LONG_BEFORE_S = PAST_THE_BOUND_S + 30


def _pooled_pid(store: AuditStore) -> int:
    """The backend of the pool's session (checked out and back in: idle in the pool afterwards)."""
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_a_statement_the_server_is_still_running_is_waited_for_past_the_bound(short_store: AuditStore) -> None:
    """A slow statement (a review search over a large log) is not a silent server: it was cut until 2026-12-02."""
    def sleep() -> object:
        with short_store.engine.connect() as conn:
            return conn.execute(text(f"SELECT pg_sleep({PAST_THE_BOUND_S}), 'answered'")).one()[1]

    assert _in_thread(sleep) == ["answered"]


def _active(url: str, backend_pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as other:
        row = other.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (backend_pid,)).fetchone()
    return row is not None and row[0] == "active"


def _sleeping(engine: Engine, seconds: float, url: str, backend_pid: int) -> tuple[threading.Thread, list[object]]:
    """A thread sleeping ``seconds`` in a statement on the pool's session, once the server runs it; its
    outcome (the answer, or the exception) lands in the list."""
    outcome: list[object] = []

    def sleep() -> None:
        try:
            with engine.connect() as conn:  # the same pooled session
                outcome.append(conn.execute(text(f"SELECT pg_sleep({seconds})")).scalar())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while not _active(url, backend_pid):  # stopped or frozen while it runs the statement, not before
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.02)
    return thread, outcome


def test_a_statement_on_a_server_that_stops_answering_is_cut_and_fails_the_read_closed(
        own_postgres: PostgresServer) -> None:
    """Frozen mid-statement (every server process stopped): the probe cannot even connect, so the wait is cut."""
    url = own_postgres.fresh_database("probe")
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    engine = make_engine(url, busy_timeout_s=BUSY_S)
    try:
        with engine.connect() as conn:
            backend_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        thread, outcome = _sleeping(engine, PAST_THE_BOUND_S + 5, plain, backend_pid)
        frozen = server_pids(own_postgres.process.pid)
        try:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):  # a backend that just ended (the look above)
                    os.kill(pid, signal.SIGSTOP)
            thread.join(HANG_GUARD_S)
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert not thread.is_alive(), "a read waited on a frozen server without end"
        [failed] = outcome
        assert isinstance(failed, DBAPIError) and failed.connection_invalidated, failed
        with engine.connect() as conn:  # the server answers again: the next read runs, on a new session
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend_pid
    finally:
        engine.dispose()


def test_a_statement_whose_backend_stops_while_running_it_is_cut_at_the_longest_wait(
        short_store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend stopped mid-statement (hung on a dead disk, say) stays ``active`` in ``pg_stat_activity``
    for good: the probe's answer alone waited for it without end (the read, and its request, held forever)."""
    from audit import answer_watch

    monkeypatch.setattr(answer_watch, "LONGEST_RUNNING_S", PAST_THE_BOUND_S, raising=False)  # two bounds
    url = make_url(short_store.engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
    backend_pid = _pooled_pid(short_store)
    thread, outcome = _sleeping(short_store.engine, HANG_GUARD_S * 3, url, backend_pid)
    os.kill(backend_pid, signal.SIGSTOP)
    try:
        thread.join(HANG_GUARD_S)
        ended_while_stopped = not thread.is_alive()
    finally:
        os.kill(backend_pid, signal.SIGCONT)
        with psycopg.connect(url, autocommit=True) as admin:  # ends the sleep of a read that was never cut
            admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        thread.join(HANG_GUARD_S)
    assert ended_while_stopped, "a read waited without end for a backend stopped mid-statement"
    [failed] = outcome
    assert isinstance(failed, DBAPIError) and failed.connection_invalidated, failed


def _probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "govgate-audit-answer-probe"]


def test_a_probe_whose_own_question_gets_no_answer_ends(store_url: str) -> None:
    """The probe's session, set up just before the server stops answering: its question was not bounded,
    so its thread (and session) waited without end, and a process with one never forks (``fork_is_safe``)."""
    url = make_url(store_url)
    proxy = LoopbackProxy(url.host or "127.0.0.1", url.port or 5432)
    engine = make_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
                         busy_timeout_s=BUSY_S)
    try:
        with engine.connect() as conn:  # the pooled session, opened while the proxy forwards everything
            conn.execute(text("SELECT 1"))
        proxy.silent = True  # from now on a new session (the probe's) is set up, then never answered
        assert not _probe_threads()

        def sleep() -> object:
            with engine.connect() as conn:
                return conn.execute(text(f"SELECT pg_sleep({CUT_LONG_BEFORE_S})")).scalar()

        [outcome] = _in_thread(sleep)  # the probe got no answer in time: the wait was cut
        assert isinstance(outcome, DBAPIError) and outcome.connection_invalidated, outcome
        deadline = time.monotonic() + HANG_GUARD_S
        while _probe_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _probe_threads(), "the probe waited for its answer without end"
    finally:
        engine.dispose()
        proxy.close()


def test_a_probe_whose_thread_cannot_start_reads_as_no_answer_and_the_watchdog_goes_on(
        short_store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that may start no more threads (the moment a stalled server piles waits up): the probe's
    thread start raised in the watchdog's own thread, which died, and no wait of the process was bounded again
    until a new connection restarted it."""
    _pooled_pid(short_store)  # the pool's session, watched: the watchdog runs
    watchdog = stall_watch._thread
    assert watchdog is not None and watchdog.is_alive()
    real_start = threading.Thread.start

    def no_probe_thread(thread: threading.Thread) -> None:
        if thread.name == "govgate-audit-answer-probe":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_probe_thread)

    def sleep() -> object:
        with short_store.engine.connect() as conn:
            return conn.execute(text(f"SELECT pg_sleep({CUT_LONG_BEFORE_S}), 'answered'")).one()[1]

    [outcome] = _in_thread(sleep)
    assert watchdog.is_alive(), "the watchdog died on a probe it could not start"
    assert isinstance(outcome, DBAPIError) and outcome.connection_invalidated, outcome  # not asked: cut


def test_a_patient_wait_is_never_cut(short_store: AuditStore) -> None:
    def sleep() -> object:
        with stall_watch.patient(), short_store.engine.connect() as conn:
            return conn.execute(text(f"SELECT pg_sleep({PAST_THE_BOUND_S}), 'answered'")).one()[1]

    assert _in_thread(sleep) == ["answered"]


def test_a_migration_queued_behind_another_waits_for_it_however_long(short_store: AuditStore) -> None:
    """Processes starting together queue behind the one migrating (``lock_timeout`` 0): that wait is not a stall."""
    url = make_url(short_store.engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        release = threading.Timer(PAST_THE_BOUND_S, lambda: other.execute("SELECT pg_advisory_unlock_all()"))
        release.start()
        try:
            def migrate_like() -> str:
                with locked_transaction(short_store.engine, MIGRATE_LOCK_KEY) as conn:
                    return conn.execute(text("SELECT 'migrated'")).scalar_one()

            outcome = _in_thread(migrate_like)
        finally:
            release.join()
    assert outcome == ["migrated"]


def test_the_pre_ping_of_a_frozen_pooled_session_is_cut_and_the_read_runs_on_a_new_one(
        short_store: AuditStore) -> None:
    _append(short_store, "request", "r1")
    frozen = _pooled_pid(short_store)
    os.kill(frozen, signal.SIGSTOP)
    try:
        [outcome] = _in_thread(lambda: short_store.terminal_for("r1"))  # the checkout pre-pings the frozen session
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert outcome is None, outcome  # read on a new session: no terminal entry yet
    assert _pooled_pid(short_store) != frozen


def test_the_writer_reconnects_beside_the_pool_without_touching_its_sessions(short_store: AuditStore) -> None:
    """A writer reconnecting through the pool pre-pinged an idle session first: on a frozen server, a bound's wait."""
    writer = _connection_of(short_store, "postgresql", "r1")
    pooled = _pooled_pid(short_store)
    os.kill(pooled, signal.SIGSTOP)
    try:
        with psycopg.connect(make_url(short_store.engine.url).set(drivername="postgresql")
                             .render_as_string(hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (writer,))  # the writer must reconnect
        [again] = _in_thread(lambda: _connection_of(short_store, "postgresql", "r1", kind="completion"))
    finally:
        os.kill(pooled, signal.SIGCONT)
    assert isinstance(again, int) and again not in (writer, pooled), again
    assert _pooled_pid(short_store) == pooled  # the pool's session was never pre-pinged, so never cut


def test_a_new_writer_session_whose_set_up_gets_no_answer_is_cut(
        short_store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's set-up statements talk to the server too: watched from the connect on, not from the BEGIN."""
    import audit.writer

    def set_up_without_answer(conn: object) -> None:
        with conn.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(f"SELECT pg_sleep({PAST_THE_BOUND_S})")

    monkeypatch.setattr(audit.writer, "configure_postgresql_connection", set_up_without_answer)
    [outcome] = _in_thread(lambda: _append(short_store, "request", "r1"))  # the writer's first connect
    assert isinstance(outcome, AuditError), outcome
    monkeypatch.undo()
    _append(short_store, "request", "r1")  # connects anew, set up as usual
    assert [e.kind for e in short_store.iter_entries()] == ["chain_format", "request"]
