"""Every gateway process runs a checkpointer while it is up and leaves a closing checkpoint behind.

On both backends: the gateway's database is the empty one ``db_url`` gives (tests/audit/conftest.py).
"""

from __future__ import annotations

import asyncio

import pytest

from audit import AuditStore, make_engine
from audit.checkpoints import CheckpointStore
from audit.signing import load_signing_key
from gateway.components import build_components
from gateway.settings import Settings

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
