"""The busy timeout bounds an append's whole wait: its process's other appends, then the database's lock.

An append queued behind another of its process waited for it up to the busy
timeout, then for the database's lock the whole timeout again: with SQLite
locked for 50 s, requests sent a few seconds after the first were held
42-47 s and then served, where the first was refused at 30 s (probe s55 F3).
Now the database's wait is what is left of the timeout after the process's.
Both backends (tests/audit/conftest.py), each with its lock held by another
session for longer than one timeout and released before two.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import psycopg
from sqlalchemy.engine import make_url

from audit import AuditError, AuditStore, make_engine
from audit.db import APPEND_LOCK_KEY
from audit.writer import writer_for
from tests.audit.test_postgres_lock_wait import _in_thread, _request
from tests.govgate.test_cli import _write_locked

BUSY_S = 2.0
#: When the other session lets go, from the first append's start: past the second's whole wait (0.3 + 2 s)
#: with the fix, before the first's end plus a whole timeout again (2 + 2 s) without it.
RELEASE_AT_S = 3.2
HANG_GUARD_S = 60


@contextmanager
def _locked_by_another_session(url: str, backend: str) -> Iterator[None]:
    """The store's write lock, held by another session: SQLite's, or the append's advisory lock."""
    if backend == "sqlite":
        with _write_locked(make_url(url).database):
            yield
        return
    parsed = make_url(url)
    with psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
                         dbname=parsed.database) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
        try:
            yield
        finally:
            holder.rollback()


def test_an_append_queued_behind_another_waits_only_what_is_left_of_the_timeout(store_url: str,
                                                                                   backend: str) -> None:
    store = AuditStore(make_engine(store_url, busy_timeout_s=BUSY_S))
    _request(store, "before")  # connected and at the head before the lock is taken
    writer = writer_for(store.engine)
    with _locked_by_another_session(store_url, backend):
        started = time.monotonic()
        first, first_outcome = _in_thread(lambda: _request(store, "first"))
        while writer._owner is None and not first_outcome:  # the first holds the process's connection
            assert time.monotonic() - started < HANG_GUARD_S
            time.sleep(0.005)
        time.sleep(0.3)
        second, second_outcome = _in_thread(lambda: _request(store, "second"))
        time.sleep(max(0.0, started + RELEASE_AT_S - time.monotonic()))
    first.join(HANG_GUARD_S)
    second.join(HANG_GUARD_S)
    assert isinstance(first_outcome.get("error"), AuditError), first_outcome
    # refused within its timeout, not served once the lock was let go after it
    assert isinstance(second_outcome.get("error"), AuditError), second_outcome
    _request(store, "after")  # the connection waits its whole timeout again (SQLite: its busy_timeout restored)
    assert [e.request_id for e in store.iter_entries()][-2:] == ["before", "after"]
    if backend == "sqlite":
        assert writer._cursor.execute("PRAGMA busy_timeout").fetchone()[0] == round(BUSY_S * 1000)
    store.engine.dispose()
