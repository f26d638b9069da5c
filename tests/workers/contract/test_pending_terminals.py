"""Terminal entries the database refused, kept sealed in Redis until they can be written (``pending_terminals.py``).

A real Redis of the test's own and a fresh audit store; the served cases
(a locked database under a running gateway) are in
``tests/e2e/test_terminal_recovery.py``.
"""

from __future__ import annotations

import os
import time

import pytest
import redis

from audit import AuditStore
from gateway.components import open_database
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.registry import TINY_MODEL_NAME
from workers.contract.sealing import Sealer


@pytest.fixture
def pending_parts(own_redis, tmp_path):
    """A real Redis client and a fresh audit store for the pending-entry store itself."""
    engine = open_database(own_redis.with_(database_url=f"sqlite:///{tmp_path / 'pending.db'}"))
    client = redis.Redis.from_url(own_redis.redis_url)
    yield client, AuditStore(engine)
    client.close()
    engine.dispose()


def pending_entry(request_id: str, **changes) -> PendingTerminal:
    return PendingTerminal(**{"kind": "failed", "request_id": request_id, "principal": "p", "team": None,
                              "model": TINY_MODEL_NAME, "body": {"output": "secret words", "error": {}},
                              "policy_revision": "r1", **changes})


def test_pending_entries_are_sealed_in_redis_and_written_once(pending_parts):
    client, store = pending_parts
    sealer = Sealer(os.urandom(32))
    pending = PendingTerminals(client, horizon_s=60, seal=sealer.seal, unseal=sealer.unseal)
    assert pending.keep(pending_entry("r-1"))
    assert pending.keep(pending_entry("r-1", kind="timed_out"))  # a later one for the same request is ignored
    raw = client.hget(PENDING_KEY, "r-1")
    assert b"secret words" not in raw  # what Redis holds went through the seal
    assert pending.write_all(store) == 1 and pending.count() == 0
    written = store.terminal_for("r-1")
    assert written.kind == "failed" and written.payload["output"] == "secret words"
    assert "recorded_late" in written.body


def test_pending_entries_past_the_horizon_are_given_up(pending_parts):
    client, store = pending_parts
    sealer = Sealer(os.urandom(32))
    pending = PendingTerminals(client, horizon_s=5, seal=sealer.seal, unseal=sealer.unseal)
    pending.keep(pending_entry("old", since=time.time() - 60))
    pending.keep(pending_entry("new"))
    assert pending.write_all(store) == 1 and pending.count() == 0
    assert store.terminal_for("old") is None and store.terminal_for("new") is not None


def test_an_entry_sealed_under_another_key_is_left_for_its_owner_not_dropped(pending_parts):
    client, store = pending_parts
    owner, stranger = Sealer(os.urandom(32)), Sealer(os.urandom(32))
    PendingTerminals(client, horizon_s=60, seal=owner.seal, unseal=owner.unseal).keep(pending_entry("r-owned"))
    misconfigured = PendingTerminals(client, horizon_s=60, seal=stranger.seal, unseal=stranger.unseal)
    assert misconfigured.write_all(store) == 0 and misconfigured.count() == 1  # kept, not dropped
    assert store.terminal_for("r-owned") is None
    assert PendingTerminals(client, horizon_s=60, seal=owner.seal, unseal=owner.unseal).write_all(store) == 1
    assert store.terminal_for("r-owned").payload["output"] == "secret words"


def test_an_entry_not_due_yet_waits_for_retries_but_its_own_gateway_writes_it_at_once(pending_parts):
    # A handed-over output's fallback: a retry leaves it while its gateway may still record the real end.
    client, store = pending_parts
    sealer = Sealer(os.urandom(32))
    pending = PendingTerminals(client, horizon_s=60, seal=sealer.seal, unseal=sealer.unseal)
    pending.keep(pending_entry("later", not_before=time.time() + 60))
    pending.keep(pending_entry("due", not_before=time.time() - 1))
    assert pending.write_all(store) == 1
    assert store.terminal_for("due") is not None and store.terminal_for("later") is None
    assert pending.holds("later") and not pending.holds("due")
    written = pending.write_one(store, "later")  # the request's gateway ends it: no waiting
    assert written is not None and written.kind == "failed" and not pending.holds("later")


def test_a_replacing_keep_takes_the_place_of_the_fallback(pending_parts):
    client, store = pending_parts
    sealer = Sealer(os.urandom(32))
    pending = PendingTerminals(client, horizon_s=60, seal=sealer.seal, unseal=sealer.unseal)
    pending.keep(pending_entry("r-2", body={"output": "x", "error": {"code": "output_unchecked"}},
                               not_before=time.time() + 60))
    pending.keep(pending_entry("r-2", body={"output": "x", "error": {"code": "audit_unavailable"}}), replace=True)
    assert pending.write_all(store) == 1  # the replacement is due at once
    assert store.terminal_for("r-2").body["error"]["code"] == "audit_unavailable"
