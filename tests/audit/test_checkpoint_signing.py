"""The checkpoint signing key: made once, race-free and private; a bad file is an error, never replaced."""

from __future__ import annotations

import json
import multiprocessing
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from audit.checkpoints import Checkpoint, CheckpointFileError, read_checkpoint_file, sign_checkpoint, write_checkpoint_file
from audit.signing import (
    SigningKey,
    SigningKeyError,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
)
from tests.child_processes import CHILDREN


def test_key_is_made_once_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "new" / "audit-signing.key"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_signing_key(path)
    assert again.key_id == key.key_id == key_id(key.public.raw)
    assert len(key.key_id) == 64


def _make(path: str, queue: "multiprocessing.Queue[str]") -> None:
    queue.put(load_or_create_signing_key(Path(path)).key_id)


def test_processes_starting_together_end_up_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    ctx = CHILDREN  # a fork server's (tests/child_processes.py): this process runs threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(path), queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    ids = {queue.get(timeout=30) for _ in procs}
    for proc in procs:
        proc.join(30)
    assert ids == {load_signing_key(path).key_id}
    assert [p.name for p in tmp_path.iterdir()] == ["audit-signing.key"]  # no temporary left behind


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_a_bad_key_file_is_a_clear_error_and_is_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "audit-signing.key"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=str(path)):
        load_or_create_signing_key(path)
    assert path.read_bytes() == content


def test_a_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.key"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_signing_key(path)


def test_an_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    path.mkdir()  # a folder where the file should be
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_or_create_signing_key(path)


def test_public_key_reads_back_from_pem_hex_and_the_private_file(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k.key")
    (tmp_path / "pub.pem").write_bytes(key.public.pem())
    (tmp_path / "pub.hex").write_text(key.public.hex + "\n")
    for name in ("pub.pem", "pub.hex", "k.key"):
        assert load_public_key(tmp_path / name) == key.public
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(SigningKeyError):
        load_public_key(tmp_path / "junk")


def test_a_signature_verifies_only_for_its_message_and_key() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    checkpoint = sign_checkpoint(key, 5, "ab" * 32)
    assert checkpoint.signature_problem(key.public) is None
    assert "another key" in checkpoint.signature_problem(other.public)
    for change in ({"seq": 6}, {"head_hash": "cd" * 32}, {"closing": True},
                   {"created_at": datetime(2020, 1, 1, tzinfo=timezone.utc)}):
        edited = Checkpoint(**{**_fields(checkpoint), **change})
        assert "does not verify" in edited.signature_problem(key.public)
    forged = Checkpoint(**{**_fields(checkpoint), "key_id": other.key_id})
    assert "does not verify" in forged.signature_problem(other.public)
    assert not key.public.verifies(checkpoint.message(), "zz")


def test_signed_message_is_canonical_json_of_the_documented_fields() -> None:
    key = SigningKey.generate()
    moment = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone.utc)
    checkpoint = sign_checkpoint(key, 7, "ab" * 32, closing=True, created_at=moment)
    assert checkpoint.message() == (
        '{"closing":true,"created_at":"2024-05-01T12:00:00.000005+00:00","format":"govgate-checkpoint/1",'
        f'"head_hash":"{"ab" * 32}","key_id":"{key.key_id}","seq":7}}').encode()


def test_checkpoint_file_round_trips_and_bad_files_are_refused(tmp_path: Path) -> None:
    key = SigningKey.generate()
    checkpoint = sign_checkpoint(key, 3, "ef" * 32)
    path = tmp_path / "cp.json"
    write_checkpoint_file(path, checkpoint, key.public)
    read, named = read_checkpoint_file(path)
    assert read == checkpoint and named == key.public.hex
    doc = json.loads(path.read_text())
    for bad in ({**doc, "format": "x"}, {**doc, "seq": "3"}, {k: v for k, v in doc.items() if k != "signature"},
                {**doc, "created_at": "2024-05-01 12:00"}, [doc]):
        path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointFileError):
            read_checkpoint_file(path)
    path.write_text("{")
    with pytest.raises(CheckpointFileError, match="not JSON"):
        read_checkpoint_file(path)


def _fields(checkpoint: Checkpoint) -> dict[str, object]:
    return {name: getattr(checkpoint, name) for name in Checkpoint.__slots__}


def test_checkpoint_settings_defaults_env_and_refusals(tmp_path: Path) -> None:
    from gateway.settings import Settings, SettingsError

    default = Settings.from_env({"GOVGATE_VAR_DIR": str(tmp_path)})
    assert default.effective_audit_signing_key_file == tmp_path.resolve() / "audit-signing.key"
    assert (default.checkpoint_every_entries, default.checkpoint_interval_s, default.checkpoint_command) == (1000, 10.0, "")
    given = Settings.from_env({"GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_AUDIT_SIGNING_KEY_FILE": "~/k.pem",
                               "GOVGATE_CHECKPOINT_EVERY_ENTRIES": "50", "GOVGATE_CHECKPOINT_INTERVAL_S": "2.5",
                               "GOVGATE_CHECKPOINT_COMMAND": "  cat > /tmp/x  "})
    assert given.effective_audit_signing_key_file == Path("~/k.pem").expanduser().resolve()
    assert (given.checkpoint_every_entries, given.checkpoint_interval_s, given.checkpoint_command) == \
        (50, 2.5, "cat > /tmp/x")
    child = Settings.from_env(given.to_env())  # what child processes read back
    assert (child.effective_audit_signing_key_file, child.checkpoint_every_entries, child.checkpoint_interval_s,
            child.checkpoint_command) == (given.effective_audit_signing_key_file, 50, 2.5, "cat > /tmp/x")
    for name, value in (("CHECKPOINT_EVERY_ENTRIES", "0"), ("CHECKPOINT_INTERVAL_S", "0"),
                        ("CHECKPOINT_EVERY_ENTRIES", "many")):
        with pytest.raises(SettingsError, match=f"GOVGATE_{name}"):
            Settings.from_env({f"GOVGATE_{name}": value})
