"""The writer connection (audit/writer.py) on PostgreSQL: sessions the server ends.

A restart or an administrator's ``pg_terminate_backend`` ends the writer's
kept session; the next append must still work (what ``pool_pre_ping`` did
for a pooled connection), and a session lost in the middle of an append
must fail that append closed, never retry it (the insert may have run).
"""

from __future__ import annotations

from typing import Any

import pytest

from audit import AuditError, AuditStore, verify_chain
from tests.audit.conftest import RawDB
from tests.audit.test_writer import _append, _connection_of


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL here (overrides the two-backend parameter of tests/audit/conftest.py)."""
    return "postgresql"


def test_a_connection_killed_between_appends_is_replaced_without_a_failed_append(
        store: AuditStore, backend: str, raw: RawDB) -> None:
    first = _connection_of(store, backend, "r1")
    [(killed,)] = raw.rows("SELECT count(pg_terminate_backend(:pid))", {"pid": first})
    assert killed == 1
    second = _connection_of(store, backend, "r1", kind="completion")  # succeeds: retried on a new connection
    assert second != first
    entries = list(store.iter_entries())
    assert [e.kind for e in entries] == ["chain_format", "request", "completion"] and verify_chain(store).ok


def test_a_connection_lost_inside_the_transaction_fails_closed_and_is_not_retried(
        store: AuditStore, backend: str) -> None:
    _append(store, "request", "r1")
    runs: list[int] = []

    def die(cursor: Any) -> None:
        runs.append(1)
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with pytest.raises(AuditError):
        _append(store, "completion", "r1", alongside=die)
    assert runs == [1]  # the insert ran once; after it, a retry could write the entry twice
    assert store.terminal_for("r1") is None  # nothing recorded
    done = _append(store, "completion", "r1")  # and the next append connects anew
    assert store.terminal_for("r1") == done and verify_chain(store).checked == 3
