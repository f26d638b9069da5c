"""The checkpoint a gateway vouched for, kept on its host: what a fresh start and ``verify`` hold the database to.

Both backends. The attacker writes the database (its guard triggers switched
off) while every gateway is down, without the signing key and without the
gateway host's folder. Each attack is first shown passing a start without the
memory (the gap the memory closes), then caught with it.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from audit.checkpoint_check import GONE, check_checkpoints
from audit.checkpoint_memory import MEMORY_FORMAT, CheckpointMemory, database_name
from audit.checkpoints import CheckpointFileError, sign_checkpoint
from audit.signing import SigningKey
from gateway.checkpointer import Checkpointer
from gateway.settings import Settings, SettingsError
from govgate.cli import main
from tests.audit.conftest import RawDB
from tests.audit.test_checkpoint_tamper import MAX_AGE, Trail

pytestmark = pytest.mark.anyio


@pytest.fixture
def trail(raw: RawDB) -> Iterator[Trail]:
    t = Trail(raw)
    yield t
    t.engine.dispose()


@pytest.fixture
def memory(trail: Trail, tmp_path: Path) -> CheckpointMemory:
    return CheckpointMemory(tmp_path / "checkpoint-memory", database_name(trail.raw.url))


def _gateway(trail: Trail, memory: CheckpointMemory | None) -> Checkpointer:
    return Checkpointer(trail.checkpoints, trail.audit, trail.key, every_entries=1000, interval_s=3600,
                        poll_s=3600, memory=memory)


async def _run_and_stop(trail: Trail, memory: CheckpointMemory | None, entries: int = 0) -> Checkpointer:
    """A gateway's life: start, serve ``entries``, sign, stop (its closing checkpoint)."""
    gateway = _gateway(trail, memory)
    await gateway.start()
    trail.append(entries, tag=f"served-{trail.head_seq()}")
    if gateway._start_checked:  # as its loop: no signing before the start check's judgement (a young tail waits)
        await gateway.tick()
    await gateway.aclose()
    return gateway


def _cut_back(trail: Trail, seq: int) -> None:
    """While every gateway is down: the entries after ``seq`` deleted, and the checkpoints and marks above it."""
    trail.sql(f"DELETE FROM audit_entries WHERE seq > {seq}", f"DELETE FROM audit_closing_marks WHERE seq > {seq}",
              f"DELETE FROM audit_checkpoints WHERE seq > {seq}")
    trail.engine.dispose()


def _anomalies(trail: Trail) -> list[dict]:
    return [entry.body for entry in trail.audit.tail(1000) if entry.kind == "chain_anomaly"]


# -- the file -------------------------------------------------------------------------------


def test_a_memory_keeps_one_signed_checkpoint_per_database(trail: Trail, memory: CheckpointMemory) -> None:
    trail.append(3)
    trail.checkpoint()
    stored = trail.checkpoints.latest()
    assert memory.load(trail.key.public) is None  # nothing kept yet
    memory.remember(stored, trail.key.public)
    assert CheckpointMemory(memory.path.parent, memory.database).load(trail.key.public) == stored
    assert stat.S_IMODE(memory.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(memory.path.stat().st_mode) == 0o600  # as every file under var/ (0644 until probe s54)
    doc = json.loads(memory.path.read_text())
    assert doc["format"] == MEMORY_FORMAT and doc["database"] == memory.database and "secret" not in doc["database"]
    other = CheckpointMemory(memory.path.parent, "postgresql://govgate@elsewhere/govgate")
    assert other.path != memory.path and other.load(trail.key.public) is None
    assert [p.name for p in memory.path.parent.iterdir()] == [memory.path.name]  # no temporary file left


def test_the_database_name_leaves_out_password_and_driver() -> None:
    assert database_name("postgresql+psycopg://govgate:s3cret@db:5432/audit") == \
        database_name("postgresql://govgate:s3cret@db:5432/audit") == "postgresql://govgate:***@db:5432/audit"


@pytest.mark.parametrize("damage", ["edited", "another key", "another database", "not json", "other format"])
def test_a_memory_that_is_not_this_keys_checkpoint_of_this_database_is_refused(trail: Trail, memory: CheckpointMemory,
                                                                               damage: str) -> None:
    trail.append(3)
    trail.checkpoint()
    stored = trail.checkpoints.latest()
    key = SigningKey.generate() if damage == "another key" else trail.key
    memory.remember(sign_checkpoint(key, stored.seq, stored.head_hash), key.public)
    doc = json.loads(memory.path.read_text())
    if damage == "edited":
        doc["checkpoint"]["seq"] = stored.seq - 1
    elif damage == "another database":
        doc["database"] = "sqlite:////elsewhere/govgate.db"
    elif damage == "other format":
        doc["format"] = "govgate-checkpoint-memory/0"
    memory.path.write_text("{" if damage == "not json" else json.dumps(doc))
    with pytest.raises(CheckpointFileError):
        CheckpointMemory(memory.path.parent, memory.database).load(trail.key.public)


def test_the_memory_folder_setting(tmp_path: Path) -> None:
    var = tmp_path / "var"
    assert Settings.from_env({"GOVGATE_VAR_DIR": str(var)}).effective_checkpoint_memory_dir == \
        var.resolve() / "checkpoint-memory"
    assert Settings.from_env({"GOVGATE_CHECKPOINT_MEMORY_DIR": "OFF"}).effective_checkpoint_memory_dir is None
    given = Settings.from_env({"GOVGATE_CHECKPOINT_MEMORY_DIR": str(tmp_path / "mem")})
    assert given.effective_checkpoint_memory_dir == (tmp_path / "mem").resolve()
    with pytest.raises(SettingsError):
        Settings.from_env({"GOVGATE_CHECKPOINT_INTERVAL_S": "0"})  # the neighbours still validate


# -- what a start does with it --------------------------------------------------------------------------


async def test_a_clean_restart_with_a_memory_records_nothing_and_remembers_the_closing_checkpoint(
        trail: Trail, memory: CheckpointMemory) -> None:
    trail.append(3)
    await _run_and_stop(trail, memory, entries=2)
    closing = trail.checkpoints.latest()
    assert closing.closing and memory.load(trail.key.public) == closing
    await _run_and_stop(trail, memory, entries=2)
    assert _anomalies(trail) == []
    assert memory.load(trail.key.public) == trail.checkpoints.latest() and trail.check().ok


async def test_a_log_cut_back_to_a_signed_checkpoint_is_named_at_the_next_start(trail: Trail,
                                                                               memory: CheckpointMemory) -> None:
    trail.append(4)
    kept = trail.checkpoint()
    await _run_and_stop(trail, memory, entries=3)
    remembered = memory.load(trail.key.public)
    _cut_back(trail, kept)
    assert trail.check().ok  # nothing in the database tells
    without = _gateway(trail, None)
    await without.start()
    assert _anomalies(trail) == []  # the gap: a start without the memory sees nothing either
    await without.aclose()
    _cut_back(trail, kept)
    await _run_and_stop(trail, memory)
    [anomaly] = _anomalies(trail)
    assert anomaly["reason"] == GONE and anomaly["checkpoint_seq"] == remembered.seq
    assert anomaly["checkpoint_head_hash"] == remembered.head_hash and anomaly["latest_checkpoint"] == kept
    assert f"no entry {remembered.seq}" in anomaly["problem"]
    entry = next(e for e in trail.audit.tail(10) if e.kind == "chain_anomaly")
    assert entry.request_id == f"chain-anomaly-checkpoint-{remembered.seq}-gone"
    verdict = trail.check()
    assert verdict.ok  # signed over, and named: the reviewer reads it
    assert any(f"checkpoint at seq {remembered.seq}" in line and "gone" in line for line in verdict.anomalies)
    assert memory.load(trail.key.public) == trail.checkpoints.latest()  # the memory starts again from here
    await _run_and_stop(trail, memory)
    assert len(_anomalies(trail)) == 1  # named once


async def test_a_rewrite_under_deleted_checkpoints_is_named_at_the_next_start(trail: Trail,
                                                                              memory: CheckpointMemory) -> None:
    trail.append(4)
    first = trail.checkpoint()
    await _run_and_stop(trail, memory, entries=4)
    remembered = memory.load(trail.key.public)
    count = trail.head_seq() - first
    # Entries after the first checkpoint rewritten with fresh hashes, the checkpoints above it deleted;
    # the forged entries are dated now, well within the max age of the first checkpoint.
    _cut_back(trail, first)
    trail.append(count, tag="forged")
    assert trail.head_seq() == remembered.seq
    await _run_and_stop(trail, memory)
    [anomaly] = _anomalies(trail)
    assert anomaly["reason"] == GONE and "rewritten" in anomaly["problem"]
    assert anomaly["latest_checkpoint"] == first


async def test_a_deleted_closing_mark_no_longer_hides_entries_forged_after_it(trail: Trail,
                                                                              memory: CheckpointMemory) -> None:
    trail.append(3)
    gateway = _gateway(trail, memory)
    await gateway.start()
    await gateway.tick()  # signs the head: the stop's closing checkpoint becomes a closing mark
    await gateway.aclose()
    remembered = memory.load(trail.key.public)
    assert remembered.closing and trail.checkpoints.get(remembered.seq).closing is False
    trail.sql("DELETE FROM audit_closing_marks")
    trail.engine.dispose()
    trail.append(1, tag="forged")  # after a plain checkpoint, young: nothing to see without the mark
    await _run_and_stop(trail, memory)
    [anomaly] = _anomalies(trail)
    assert anomaly["reason"] == GONE and "closing mark was deleted" in anomaly["problem"]


async def test_replicas_sharing_a_memory_name_a_gone_checkpoint_once(trail: Trail, memory: CheckpointMemory) -> None:
    trail.append(3)
    await _run_and_stop(trail, memory, entries=2)
    _cut_back(trail, 2)
    first, second = _gateway(trail, memory), _gateway(trail, CheckpointMemory(memory.path.parent, memory.database))
    await first.start()
    await second.start()  # read the same memory before the first wrote its new one
    await first.aclose()
    await second.aclose()
    assert len(_anomalies(trail)) == 1


async def test_an_unusable_memory_is_logged_and_replaced(trail: Trail, memory: CheckpointMemory,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    trail.append(3)
    await _run_and_stop(trail, memory)
    memory.path.write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="gateway.checkpointer"):
        await _run_and_stop(trail, memory, entries=1)
    assert any("is not JSON" in r.getMessage() and "going on without it" in r.getMessage() for r in caplog.records)
    assert _anomalies(trail) == []
    assert CheckpointMemory(memory.path.parent, memory.database).load(trail.key.public) == trail.checkpoints.latest()


async def test_a_checkpoint_row_inserted_without_the_key_is_not_remembered(trail: Trail, memory: CheckpointMemory,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    trail.append(3)
    await _run_and_stop(trail, memory)
    good = memory.load(trail.key.public)
    trail.append(2, tag="later")
    forged = sign_checkpoint(SigningKey.generate(), trail.head_seq(), trail.audit.head().hash)
    trail.sql("INSERT INTO audit_checkpoints (seq, head_hash, created_at, key_id, signature, closing) VALUES "
              f"({forged.seq}, '{forged.head_hash}', '{forged.created_at.strftime('%Y-%m-%d %H:%M:%S.%f')}', "
              f"'{trail.key.key_id}', '{forged.signature}', {'false' if trail.backend == 'postgresql' else '0'})")
    gateway = _gateway(trail, memory)
    with caplog.at_level(logging.WARNING, logger="gateway.checkpointer"):
        await gateway.start()
        gateway._vouch(trail.checkpoints.latest())  # vouched again (the next looks): said once
    assert memory.load(trail.key.public) == good  # an unverifiable checkpoint would have made the memory unreadable
    assert sum("does not verify" in r.getMessage() for r in caplog.records) == 1
    await gateway.aclose()


async def test_a_memory_that_cannot_be_written_leaves_signing_alone(trail: Trail, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    trail.append(3)
    with caplog.at_level(logging.ERROR, logger="gateway.checkpointer"):
        await _run_and_stop(trail, CheckpointMemory(blocked, database_name(trail.raw.url)), entries=2)
    assert trail.checkpoints.latest().closing and trail.checkpoints.latest().seq == trail.head_seq()
    assert sum("cannot write checkpoint memory" in r.getMessage() for r in caplog.records) == 1  # once, not per try


# -- verify --------------------------------------------------------------------------


def test_verify_holds_the_database_to_this_hosts_memory(trail: Trail, memory: CheckpointMemory) -> None:
    trail.append(5)
    trail.checkpoint()
    memory.remember(trail.checkpoints.latest(), trail.key.public)
    remembered = memory.load(trail.key.public)
    assert check_checkpoints(trail.checkpoints, trail.key.public, remembered=remembered, max_unsigned_age_s=MAX_AGE).ok
    trail.sql(f"DELETE FROM audit_entries WHERE seq > {remembered.seq - 2}", "DELETE FROM audit_checkpoints")
    assert trail.check().ok  # young and unsigned: the database alone passes
    verdict = check_checkpoints(trail.checkpoints, trail.key.public, remembered=remembered, max_unsigned_age_s=MAX_AGE)
    assert not verdict.ok and any("checkpoint memory" in p and f"no entry {remembered.seq}" in p
                                  for p in verdict.problems)
    forged = sign_checkpoint(SigningKey.generate(), remembered.seq, remembered.head_hash)
    assert any("signed by another key" in p for p in check_checkpoints(
        trail.checkpoints, trail.key.public, remembered=forged, max_unsigned_age_s=MAX_AGE).problems)


class Host:
    """A gateway's host: its var dir (the signing key, the memory) and the CLI run with it."""

    def __init__(self, trail: Trail, root: Path) -> None:
        self.trail = trail
        var = root / "var"
        var.mkdir()
        (var / "audit-signing.key").write_bytes(trail.key.private_pem())
        (var / "audit-signing.key").chmod(0o600)
        self.env = {"GOVGATE_VAR_DIR": str(var), "GOVGATE_DATABASE_URL": trail.raw.url}
        folder = Settings.from_env(self.env).effective_checkpoint_memory_dir
        self.memory = CheckpointMemory(folder, database_name(trail.raw.url))
        self.pub = root / "pub.pem"
        self.pub.write_bytes(trail.key.public.pem())

    def run(self, *args: str) -> str:
        """The command's exit status, a newline, and its output (stderr included)."""
        self.trail.engine.dispose()
        result = CliRunner().invoke(main, list(args), env=self.env, catch_exceptions=False)
        return f"{result.exit_code}\n{result.output}"

    def verify(self) -> str:
        return self.run("audit", "verify", "--public-key", str(self.pub))


@pytest.fixture
def host(trail: Trail, tmp_path: Path) -> Host:
    return Host(trail, tmp_path)


async def test_the_verify_command_reads_the_memory_of_its_database(trail: Trail, host: Host) -> None:
    trail.append(4)
    await _run_and_stop(trail, host.memory, entries=2)
    seq = host.memory.load(trail.key.public).seq
    out = host.verify()
    assert out.startswith("0\n") and f"and this host's checkpoint memory (seq {seq})" in out, out
    _cut_back(trail, seq - 1)
    out = host.verify()
    assert out.startswith("1\n") and "checkpoints TAMPERED" in out and "checkpoint memory" in out, out
    await _run_and_stop(trail, host.memory)  # the next start names it, and the memory starts again
    out = host.verify()
    assert out.startswith("0\n") and f"checkpoint at seq {seq}" in out and "chain_anomaly" in out, out
    host.memory.path.write_text("{")
    out = host.verify()
    assert out.startswith("0\n") and "is not JSON" in out and "not used" in out, out


async def test_the_signing_commands_refuse_while_the_remembered_checkpoint_is_gone(trail: Trail, host: Host,
                                                                                   tmp_path: Path) -> None:
    """``audit checkpoint`` and ``export-bundle`` would vouch for the cut log (a file kept elsewhere that verifies);
    a key command run while down leaves its entry for the gateway's start rather than sign after the cut."""
    trail.append(3)
    kept = trail.checkpoint(closing=True)  # a stop's closing checkpoint, later the one cut back to
    await _run_and_stop(trail, host.memory, entries=3)
    seq = host.memory.load(trail.key.public).seq
    _cut_back(trail, kept)
    for command in (["audit", "checkpoint"], ["audit", "export-bundle", "--out", str(tmp_path / "b.jsonl")]):
        out = host.run(*command)
        assert out.startswith("1\n") and "refusing to sign" in out and f"checkpoint at seq {seq}" in out, out
    assert not (tmp_path / "b.jsonl").exists() and trail.checkpoints.latest().seq == kept
    out = host.run("keys", "create", "--user", "carol", "--role", "admin")
    assert out.startswith("0\n") and "left for a gateway to sign" in out, out
    assert trail.checkpoints.latest().seq == kept  # its entry directly follows a closing checkpoint: not signed
    await _run_and_stop(trail, host.memory)
    assert [a["reason"] for a in _anomalies(trail)] == [GONE, "after_closing"]
    out = host.run("audit", "checkpoint")
    assert out.startswith("0\n"), out
