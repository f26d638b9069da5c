"""The audit database's busy timeout: one value per engine, used by every wait on its lock.

``make_engine(url, busy_timeout_s=…)`` (the operator's ``GOVGATE_DATABASE_BUSY_TIMEOUT_S``)
sets SQLite's busy handler and is kept with the engine, so the writer's wait
for its own process's other appends (:mod:`audit.writer`) is the same length.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from audit import AuditError, AuditStore, make_engine, migrate
from audit.db import BUSY_TIMEOUT_S, busy_timeout_s
from audit.writer import writer_for


def _append(store: AuditStore, request_id: str):
    return store.append("request", request_id, principal="p", team="t", model="m", body={"n": request_id},
                        policy_revision="rev")


def _pragma_busy_timeout(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA busy_timeout").scalar()


def test_the_default_is_thirty_seconds(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert busy_timeout_s(engine) == BUSY_TIMEOUT_S == 30.0
        assert _pragma_busy_timeout(engine) == 30000
    finally:
        engine.dispose()


@pytest.mark.parametrize(("seconds", "millis"), [(2.5, 2500), (0.0004, 1), (600, 600000), (86400, 86400000)])
def test_sqlite_waits_as_long_as_the_engine_was_told(tmp_path: Path, seconds: float, millis: int) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_s=seconds)
    try:
        assert busy_timeout_s(engine) == seconds
        assert _pragma_busy_timeout(engine) == millis  # every pooled connection, as each connects
    finally:
        engine.dispose()


def test_each_engine_keeps_its_own(tmp_path: Path) -> None:
    short = make_engine(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_s=1.0)
    long = make_engine(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_s=45.0)
    try:
        assert (busy_timeout_s(short), busy_timeout_s(long)) == (1.0, 45.0)
        assert (_pragma_busy_timeout(short), _pragma_busy_timeout(long)) == (1000, 45000)
    finally:
        short.dispose()
        long.dispose()


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), 86400.5])
def test_a_timeout_that_is_not_a_positive_duration_is_refused(tmp_path: Path, seconds: float) -> None:
    with pytest.raises(AuditError, match="busy timeout"):
        make_engine(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_s=seconds)


def test_a_locked_database_fails_the_append_after_the_busy_timeout(tmp_path: Path) -> None:
    """The short timeout is really SQLite's: a lock held elsewhere refuses the append (fail closed)."""
    path = tmp_path / "a.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=0.2)
    migrate(engine)
    store = AuditStore(engine)
    first = _append(store, "r1").seq
    holder = sqlite3.connect(path, isolation_level=None, timeout=60)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(AuditError, match="locked"):
            _append(store, "r2")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _append(store, "r3").seq == first + 1  # nothing of r2 was written; the store works again
    engine.dispose()


def test_a_thread_waits_for_the_writer_as_long_as_the_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_s=0.05)
    migrate(engine)
    store = AuditStore(engine)
    first = _append(store, "r1").seq
    writer = writer_for(engine)
    assert writer._wait_s == 0.05
    assert writer._lock.acquire()  # another thread of this process holds the writer
    try:
        caught: list[BaseException] = []

        def try_append() -> None:
            with pytest.raises(AuditError) as info:
                _append(store, "r2")
            caught.append(info.value)

        thread = threading.Thread(target=try_append)
        thread.start()
        thread.join(30)
        assert len(caught) == 1 and "waited 0.05 s for this process's other audit appends" in str(caught[0])
    finally:
        writer._lock.release()
    assert _append(store, "r3").seq == first + 1
    engine.dispose()


def test_a_postgresql_engine_keeps_it_for_the_writer() -> None:
    """No server needed: the engine is made without connecting."""
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", busy_timeout_s=7.0)
    try:
        assert busy_timeout_s(engine) == 7.0
        assert writer_for(engine)._wait_s == 7.0
    finally:
        engine.dispose()
