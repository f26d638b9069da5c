"""The chain page's incremental verify: it reaches what ``verify_chain`` reaches, step by step, and finds tampering."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from audit import AuditStore, verify_chain
from gateway.components import open_database
from gateway.console import chain_status as status_module
from gateway.console.chain_status import Verified, advance, chain_status
from gateway.settings import Settings
from govgate.redis_server import RedisProcess

pytestmark = pytest.mark.anyio


def _fill(store: AuditStore, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        store.append("request", f"chain-{i}", principal="p", team="t", model="m", policy_revision="rev",
                     body={"endpoint": "chat.completions", "decision": {"allow": True, "reasons": []}},
                     payload={"messages": [{"role": "user", "content": f"hello {i}"}]})


def _new_store(folder: Path, count: int) -> AuditStore:
    store = AuditStore(open_database(Settings(var_dir=folder)))
    _fill(store, count)
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    store = _new_store(tmp_path, 30)
    yield store
    store.engine.dispose()


def _tamper(store: AuditStore, statement: str) -> None:
    """Change a row behind the store's back (the append-only triggers dropped first, as a DBA could)."""
    with store.engine.begin() as conn:
        for (name,) in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                         "AND tbl_name = 'audit_entries'")):
            conn.execute(text(f'DROP TRIGGER "{name}"'))
        conn.execute(text(statement))


def _until_head(store: AuditStore, verified: Verified) -> tuple[Verified, list[int]]:
    head = store.head().seq
    steps = []
    while verified.problem is None and verified.seq < head:
        verified = advance(store.engine, verified, head)
        steps.append(verified.seq)
    return verified, steps


def test_step_by_step_it_reaches_what_verify_reaches(store: AuditStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_module, "STEP", 7)
    verified, steps = _until_head(store, Verified(0, "0" * 64, None, None))
    full = verify_chain(store)
    assert full.ok and verified.problem is None
    assert (verified.seq, verified.hash) == (full.head_seq, full.head_hash)
    assert all(b - a <= 7 for a, b in zip([0, *steps], steps)) and len(steps) >= 4
    _fill(store, 5, start=30)  # appends after: the next step goes on from where it stopped
    later, _ = _until_head(store, verified)
    assert (later.seq, later.hash) == (verify_chain(store).head_seq, verify_chain(store).head_hash)


@pytest.mark.parametrize("statement", [
    "UPDATE audit_entries SET principal = 'mallory' WHERE seq = 20",
    "DELETE FROM audit_entries WHERE seq = 20",
])
def test_a_change_ahead_of_the_verified_entry_is_found_where_verify_finds_it(
        store: AuditStore, monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    monkeypatch.setattr(status_module, "STEP", 6)
    verified, _ = _until_head(store, Verified(0, "0" * 64, None, None))
    _fill(store, 20, start=30)
    _tamper(store, statement.replace("20", str(verified.seq + 8)))
    found, _ = _until_head(store, verified)
    full = verify_chain(store)
    assert not full.ok and found.problem is not None
    assert found.bad_seq == full.first_bad_seq
    assert found.seq < full.first_bad_seq


async def test_the_status_is_kept_in_redis_per_chain(store: AuditStore, tmp_path: Path,
                                                    redis_server: RedisProcess) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    other = _new_store(tmp_path / "other", 12)
    try:
        first = await chain_status(client, store.engine)
        assert first.head_seq == store.head().seq == first.verified.seq and first.verified.problem is None
        mine = await chain_status(client, other.engine)  # another chain on the same Redis: its own figure
        assert mine.verified.seq == other.head().seq and mine.verified.problem is None
        _fill(store, 3, start=100)
        assert (await chain_status(client, store.engine)).verified.seq == store.head().seq
        last = store.head().seq
        _tamper(store, f"UPDATE audit_entries SET hash = '{'f' * 64}' WHERE seq = {last}")
        broken = await chain_status(client, store.engine)
        assert broken.verified.problem is not None and broken.verified.bad_seq == last
        _fill(store, 1, start=200)  # the problem stays: nothing more is verified past it
        assert (await chain_status(client, store.engine)).verified.problem is not None
        assert (await chain_status(client, other.engine)).verified.problem is None
    finally:
        other.engine.dispose()
        await client.aclose()


async def test_a_checkpoint_its_entry_no_longer_matches_is_shown_whatever_redis_keeps(
        store: AuditStore, redis_server: RedisProcess) -> None:
    # The page trusted its Redis marker alone: deleted (as the page tells an operator to do after looking
    # into a problem) or edited, it showed a chain rewritten under its checkpoints as verified and signed
    from audit.checkpoints import CheckpointStore
    from audit.signing import SigningKey

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        CheckpointStore(store.engine).make(SigningKey.generate())
        clean = await chain_status(client, store.engine)
        assert clean.checkpoint is not None and clean.checkpoint_entry_hash is None
        signed = clean.checkpoint.seq
        _tamper(store, f"UPDATE audit_entries SET hash = '{'e' * 64}' WHERE seq = {signed}")
        for key in await client.keys(f"{status_module.STATE_KEY}:*"):
            await client.delete(key)  # the console's own memory gone
        shown = await chain_status(client, store.engine)
        assert shown.checkpoint_entry_hash == "e" * 64
        _tamper(store, f"DELETE FROM audit_entries WHERE seq = {signed}")
        assert (await chain_status(client, store.engine)).checkpoint_entry_hash == ""
    finally:
        await client.aclose()


def test_the_chain_page_says_when_the_checkpoint_no_longer_matches_its_entry() -> None:
    from datetime import datetime, timezone

    from audit.checkpoints import sign_checkpoint
    from audit.signing import SigningKey
    from gateway.console.chain_status import ChainStatus
    from gateway.console.render import _environment

    checkpoint = sign_checkpoint(SigningKey.generate(), 12, "a" * 64)
    template = _environment().get_template("chain.html")
    shown = {}
    for stored in (None, "e" * 64, ""):
        status = ChainStatus(12, datetime.now(timezone.utc), checkpoint, Verified(12, "a" * 64, None, None),
                             checkpoint_entry_hash=stored)
        shown[stored] = template.render(chain=status, step=10, now=0.0, user=None, active=None)
    assert "rewritten or cut under the checkpoint" not in shown[None]
    assert "that entry now stores" in shown["e" * 64] and "e" * 64 in shown["e" * 64]
    assert "there is no such entry now" in shown[""]


async def test_a_closing_checkpoint_a_command_signed_is_not_called_a_gateway_s_stop(
        store: AuditStore, redis_server: RedisProcess) -> None:
    """``govgate keys create`` run while no gateway runs signs its own entry as a closing checkpoint
    (``govgate/own_entries.py``), and the page said of every closing checkpoint "written as a gateway stopped".
    A checkpoint does not record who signed it, so the page names both writers."""
    from audit.checkpoints import CheckpointStore
    from audit.signing import SigningKey
    from gateway.console.render import _environment

    key, checkpoints = SigningKey.generate(), CheckpointStore(store.engine)
    checkpoints.make(key, closing=True)  # the last gateway's stop
    _fill(store, 1, start=30)  # the command's own entry, while none runs
    own = store.head()
    assert checkpoints.close_over_own(key, own.seq, own.hash) is not None
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        status = await chain_status(client, store.engine)
    finally:
        await client.aclose()
    assert status.checkpoint is not None and status.checkpoint.closing and status.checkpoint.seq == own.seq
    shown = _environment().get_template("chain.html").render(chain=status, step=10, now=0.0, user=None, active=None)
    assert "written as a gateway stopped" not in shown
    assert "written by a gateway as it stopped, or by an operator's command" in shown
