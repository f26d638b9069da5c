"""Every gateway process runs a checkpointer while it is up and leaves a closing checkpoint behind.

On both backends: the gateway's database is the empty one ``db_url`` gives (tests/audit/conftest.py).
"""

from __future__ import annotations

import asyncio

import pytest

from audit import AuditStore, make_engine
from audit.checkpoint_check import CLOSING_GRACE_S
from audit.checkpoints import CheckpointStore
from audit.kinds import CHAIN_ANOMALY
from audit.signing import load_signing_key
from gateway.components import build_components
from gateway.settings import Settings
from tests.audit.conftest import RawDB

pytestmark = pytest.mark.anyio


async def test_a_gateway_signs_while_up_and_closes_with_a_closing_checkpoint(settings: Settings, db_url: str) -> None:
    settings = settings.with_(database_url=db_url)

    def checkpointers() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "govgate-checkpointer"]

    async with build_components(settings) as components:
        running = checkpointers()
        assert len(running) == 1 and not running[0].done()
        entry = components.audit.append("request", "checkpointed-by-the-gateway", principal="alice", team=None,
                                        model="tiny", body={}, policy_revision=None)
    assert running[0].done() and checkpointers() == []
    engine = make_engine(settings.effective_database_url)
    try:
        latest = CheckpointStore(engine).latest()
        head = AuditStore(engine).head()
    finally:
        engine.dispose()
    assert latest is not None and latest.closing and latest.seq == head.seq >= entry.seq
    key = load_signing_key(settings.effective_audit_signing_key_file)  # made at the gateway's first start
    assert latest.signature_problem(key.public) is None


async def test_a_gateway_with_a_bad_signing_key_does_not_start(settings: Settings, tmp_path) -> None:
    bad = tmp_path / "audit-signing.key"
    bad.write_text("not a key")
    with pytest.raises(RuntimeError, match="GOVGATE_AUDIT_SIGNING_KEY_FILE"):
        async with build_components(settings.with_(audit_signing_key_file=str(bad))):
            pass
    assert bad.read_text() == "not a key"


async def test_a_replica_starting_in_a_rolling_restart_names_nothing_the_running_one_signs(settings: Settings,
                                                                                             db_url: str) -> None:
    """Three replicas on one database: A stops (its head already signed, so a closing mark), B is running and
    appends at once, C starts before B's next look signs that. C used to record a (false) chain_anomaly."""
    settings = settings.with_(database_url=db_url, checkpoint_interval_s=0.5)
    engine = make_engine(settings.effective_database_url)
    checkpoints = CheckpointStore(engine)

    async def signed(seq: int) -> None:
        for _ in range(100):
            latest = checkpoints.latest()
            if latest is not None and latest.seq >= seq and not latest.closing:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"entry {seq} not signed")

    try:
        async with build_components(settings) as b:
            async with build_components(settings) as a:
                first = a.audit.append("request", "before-the-restart", principal="alice", team=None,
                                       model="tiny", body={}, policy_revision=None)
                await signed(first.seq)
            assert checkpoints.latest().closing  # A's stop closed the chain over the signed head
            running = b.audit.append("request", "the-running-replica", principal="alice", team=None,
                                     model="tiny", body={}, policy_revision=None)
            async with build_components(settings):  # C, while B's entry is still unsigned
                await signed(running.seq)  # B signs it
                await asyncio.sleep(CLOSING_GRACE_S + 1.5)  # C judges what it found once that is old enough
            anomalies = CheckpointStore(engine).entries_of_kind(CHAIN_ANOMALY)
            assert anomalies == [], anomalies
    finally:
        engine.dispose()


async def test_a_gateway_started_on_a_log_cut_back_while_it_was_down_names_the_lost_checkpoint(
        settings: Settings, db_url: str, backend: str) -> None:
    """The gateway's own memory (``GOVGATE_VAR_DIR/checkpoint-memory``): what it signed before its stop must
    still be in the database at its next start, else a ``chain_anomaly`` says it is gone."""
    settings = settings.with_(database_url=db_url)
    async with build_components(settings) as components:
        for i in range(3):
            components.audit.append("request", f"served-{i}", principal="alice", team=None, model="tiny", body={},
                                    policy_revision=None)
    engine = make_engine(settings.effective_database_url)
    try:
        closing = CheckpointStore(engine).latest()
        assert closing.closing
        engine.dispose()
        raw = RawDB(db_url, backend)
        try:
            raw.without_guards(f"DELETE FROM audit_entries WHERE seq > {closing.seq - 2}",
                               "DELETE FROM audit_checkpoints", "DELETE FROM audit_closing_marks")
        finally:
            raw.dispose()
        async with build_components(settings):
            pass
        anomalies = [body for _seq, _at, body in CheckpointStore(engine).entries_of_kind(CHAIN_ANOMALY)]
    finally:
        engine.dispose()
    assert [(a["reason"], a["checkpoint_seq"]) for a in anomalies] == [("vouched_checkpoint_gone", closing.seq)]
    assert list((settings.var_dir / "checkpoint-memory").glob("*.json"))
