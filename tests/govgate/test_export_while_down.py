"""``govgate audit export --include-text`` while no gateway runs signs its own read (probe q1, cosmetic).

The export records the operator's read as a ``payload_read`` entry first.
After a clean stop (a closing checkpoint) nothing signed that entry, and the
next gateway start recorded a ``chain_anomaly`` for an ordinary read. The
export now signs its own entry as a closing checkpoint when it directly
follows one, and pipes it to ``GOVGATE_CHECKPOINT_COMMAND`` as a gateway
does; anything else after the closing checkpoint is left for the start to
name. Real SQLite store, real CLI processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from audit import AuditStore, make_engine, migrate
from audit.checkpoint_check import anomaly_at_start
from audit.checkpoints import CheckpointStore, read_checkpoint_file
from audit.kinds import PAYLOAD_READ
from audit.signing import load_or_create_signing_key

MAX_AGE = 3600.0


def _stopped_store(tmp_path: Path) -> tuple[str, Path]:
    """A store as a gateway's clean stop leaves it: entries, then a closing checkpoint over the head."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    key = load_or_create_signing_key(tmp_path / "audit-signing.key")
    engine = make_engine(url)
    try:
        migrate(engine)
        store = AuditStore(engine)
        for i in range(3):
            store.append("request", f"r-{i}", principal="alice", team="blue", model="tiny", policy_revision=None,
                         body={"i": i}, payload={"messages": [{"role": "user", "content": "a prompt"}]})
        assert CheckpointStore(engine).make(key, closing=True) is not None
    finally:
        engine.dispose()
    return url, tmp_path / "audit-signing.key"


def _export(url: str, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_DATABASE_URL": url,
           "GOVGATE_AUDIT_SIGNING_KEY_FILE": str(tmp_path / "audit-signing.key"), **extra}
    return subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "export", "--since", "2000-01-01",
                           "--include-text", "--out", str(tmp_path / "out.jsonl")],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_an_export_while_down_signs_its_own_read_and_the_next_start_finds_nothing_unsigned(tmp_path: Path) -> None:
    url, _key = _stopped_store(tmp_path)
    kept = tmp_path / "kept.checkpoint"
    result = _export(url, tmp_path, GOVGATE_CHECKPOINT_COMMAND=f"cat > {kept}")
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        checkpoints = CheckpointStore(engine)
        head = checkpoints.head()
        latest = checkpoints.latest()
        assert head is not None and latest is not None
        kinds = [e.kind for e in AuditStore(engine).iter_entries()]
        assert kinds[-1] == PAYLOAD_READ and latest.seq == head[0] and latest.closing, (kinds, latest)
        assert anomaly_at_start(checkpoints, max_unsigned_age_s=MAX_AGE) is None
        piped, _ = read_checkpoint_file(kept)  # the witness got it, as from a gateway
        assert (piped.seq, piped.head_hash) == (latest.seq, latest.head_hash)
    finally:
        engine.dispose()


def test_an_entry_someone_else_wrote_after_the_closing_checkpoint_is_not_signed_by_the_export(
        tmp_path: Path) -> None:
    url, _key = _stopped_store(tmp_path)
    engine = make_engine(url)
    try:
        AuditStore(engine).append("completion", "r-late", principal="alice", team="blue", model="tiny",
                                  policy_revision=None, body={}, payload=None)  # not the export's: unsigned
        closing = CheckpointStore(engine).latest()
    finally:
        engine.dispose()
    result = _export(url, tmp_path)
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        checkpoints = CheckpointStore(engine)
        assert checkpoints.latest() == closing  # nothing signed: a gateway's start names both entries
        anomaly = anomaly_at_start(checkpoints, max_unsigned_age_s=MAX_AGE)
        assert anomaly is not None and anomaly["first_seq"] == closing.seq + 1, anomaly
    finally:
        engine.dispose()


def _keys(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_DATABASE_URL": url,
           "GOVGATE_AUDIT_SIGNING_KEY_FILE": str(tmp_path / "audit-signing.key"),
           "GOVGATE_REDIS_URL": "redis://127.0.0.1:1/0"}  # no gateway, no Redis: the stack is down
    return subprocess.run([sys.executable, "-m", "govgate.cli", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_key_changes_while_down_sign_their_own_entries_and_the_next_start_finds_nothing_unsigned(
        tmp_path: Path) -> None:
    """The same for ``govgate keys create`` and ``revoke``, an admin's routine work while the stack is down: each
    appends its key entry after the closing checkpoint, and the next start recorded a ``chain_anomaly`` for
    it (found beside probe q1's export case)."""
    url, _key = _stopped_store(tmp_path)
    created = _keys(url, tmp_path, "create", "--user", "bob", "--role", "analyst")
    assert created.returncode == 0, created.stderr
    key_id = created.stderr.split("key id ", 1)[1].split(":", 1)[0]
    revoked = _keys(url, tmp_path, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    engine = make_engine(url)
    try:
        checkpoints = CheckpointStore(engine)
        head, latest = checkpoints.head(), checkpoints.latest()
        assert head is not None and latest is not None
        kinds = [e.kind for e in AuditStore(engine).iter_entries()]
        assert kinds[-2:] == ["key_created", "key_revoked"], kinds
        assert latest.seq == head[0] and latest.closing, (kinds, latest)
        assert anomaly_at_start(checkpoints, max_unsigned_age_s=MAX_AGE) is None
    finally:
        engine.dispose()


def test_a_prune_while_down_signs_its_own_record(tmp_path: Path) -> None:
    """``audit prune`` run while no gateway ran left its ``payloads_erased`` entry unsigned: verify said
    UNVERIFIED and the next start named the operator's own prune in a chain_anomaly (probe s59 F4)."""
    url, _key = _stopped_store(tmp_path)
    env = {**os.environ, "GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_DATABASE_URL": url,
           "GOVGATE_AUDIT_SIGNING_KEY_FILE": str(tmp_path / "audit-signing.key")}
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "prune", "--before", "2999-01-01"],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "in the future" in result.stderr  # the guard against a typo stands
    before = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    time.sleep(1.1)  # a date the entries are older than, and not in the future
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "prune", "--before", before],
                            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and "erased the payloads of 3 entries" in result.stdout, result
    engine = make_engine(url)
    try:
        checkpoints = CheckpointStore(engine)
        latest, head = checkpoints.latest(), checkpoints.head()
        kinds = [e.kind for e in AuditStore(engine).iter_entries()]
        assert kinds[-1] == "payloads_erased" and latest is not None and head is not None
        assert latest.seq == head[0] and latest.closing
        assert anomaly_at_start(checkpoints, max_unsigned_age_s=MAX_AGE) is None
    finally:
        engine.dispose()
