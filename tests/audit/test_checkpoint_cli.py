"""``govgate audit checkpoint``, ``audit public-key`` and ``audit verify`` with checkpoints, through click.

On both backends: the commands reach the store through ``GOVGATE_DATABASE_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner, Result

from audit import AuditStore, make_engine, verify_chain
from audit.chain import canonical_text, document_hash
from audit.checkpoints import CheckpointStore
from audit.signing import load_or_create_signing_key, load_public_key
from govgate.cli import main
from tests.audit.conftest import RawDB


class Env:
    def __init__(self, root: Path, raw: RawDB) -> None:
        self.var_dir = root / "var"
        self.raw = raw
        self.env = {"GOVGATE_VAR_DIR": str(self.var_dir), "GOVGATE_DATABASE_URL": raw.url,
                    "GOVGATE_AUDIT_SIGNING_KEY_FILE": "", "GOVGATE_CHECKPOINT_INTERVAL_S": "10"}
        self.engine = make_engine(raw.url)  # migrated by the fixture
        self.store = AuditStore(self.engine)

    def append(self, n: int) -> int:
        """Append ``n`` entries; the head's seq (a new store's first entry is the chain_format one)."""
        for i in range(n):
            self.store.append("request", f"r-{i}", principal="alice", team=None, model="tiny", body={"i": i},
                              policy_revision=None)
        return self.store.head().seq

    def run(self, *args: str) -> Result:
        self.engine.dispose()
        return CliRunner().invoke(main, ["audit", *args], env=self.env, catch_exceptions=False)


@pytest.fixture
def env(tmp_path: Path, raw: RawDB) -> Iterator[Env]:
    made = Env(tmp_path, raw)
    yield made
    made.engine.dispose()


def test_without_a_signing_key_the_commands_say_where_it_should_be(env: Env) -> None:
    for args in (["public-key"], ["checkpoint"]):
        result = env.run(*args)
        assert result.exit_code == 1
        assert "no audit signing key at" in result.output and "audit-signing.key" in result.output


def test_public_key_and_checkpoint_files_verify(env: Env, tmp_path: Path) -> None:
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    head = env.append(4)
    pub, cp = tmp_path / "pub.pem", tmp_path / "cp.json"
    assert env.run("public-key", "--out", str(pub)).exit_code == 0
    assert load_public_key(pub) == key.public
    result = env.run("checkpoint", "--out", str(cp))
    assert result.exit_code == 0 and f"checkpoint of entry {head} (signed now)" in result.output
    assert json.loads(cp.read_text())["seq"] == head
    again = env.run("checkpoint")  # to stdout; the head is already signed
    assert json.loads(again.stdout)["signature"] == json.loads(cp.read_text())["signature"]
    verified = env.run("verify", "--checkpoint", str(cp), "--public-key", str(pub), "--strict")
    assert verified.exit_code == 0, verified.output
    assert "chain intact" in verified.output and "checkpoints ok: 1 stored and the checkpoint file" in verified.output


def test_verify_exits_1_on_truncation_caught_by_the_file(env: Env, tmp_path: Path) -> None:
    load_or_create_signing_key(env.var_dir / "audit-signing.key")
    head = env.append(5)
    pub, cp = tmp_path / "pub.pem", tmp_path / "cp.json"
    env.run("public-key", "--out", str(pub))
    env.run("checkpoint", "--out", str(cp))
    env.raw.without_guards(f"DELETE FROM audit_entries WHERE seq > {head - 2}", "DELETE FROM audit_checkpoints")
    assert env.run("verify", "--public-key", str(pub)).exit_code == 0  # nothing left in the database tells
    result = env.run("verify", "--checkpoint", str(cp), "--public-key", str(pub))
    assert result.exit_code == 1
    assert "chain intact" in result.output and "checkpoints TAMPERED" in result.output
    assert f"the chain has no entry {head}" in result.output


def test_verify_without_public_key_says_it_trusts_the_stores_own_key(env: Env) -> None:
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    env.append(2)
    CheckpointStore(env.engine).make(key)
    result = env.run("verify")
    assert result.exit_code == 0
    assert "the store's own key" in result.output and "--public-key" in result.output


def test_verify_strict_and_max_unsigned_age_fail_on_an_unsigned_tail(env: Env) -> None:
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    env.append(2)
    CheckpointStore(env.engine).make(key)
    head = env.append(1)
    relaxed = env.run("verify")
    assert relaxed.exit_code == 0 and f"unsigned tail: entries {head}..{head}" in relaxed.output
    assert env.run("verify", "--strict").exit_code == 1
    assert env.run("verify", "--max-unsigned-age", "0").exit_code == 1


def test_an_unsigned_tail_alone_is_unverified_not_tampered(env: Env) -> None:
    """Entries nobody signed yet are not proof of tampering: a gateway killed before its closing checkpoint
    leaves them so. ``verify`` still fails (they may also have been added while no gateway ran) but says
    what it found and its ordinary cause (probe q1 F5: "checkpoints TAMPERED" after a second Ctrl-C)."""
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    env.append(2)
    CheckpointStore(env.engine).make(key)
    head = env.append(2)
    for args in (["--strict"], ["--max-unsigned-age", "0"]):
        result = env.run("verify", *args)
        assert result.exit_code == 1, result.output
        assert "TAMPERED" not in result.output, result.output
        assert "checkpoints UNVERIFIED" in result.output and f"entries {head - 1}..{head} (2)" in result.output
        assert "killed or crashed" in result.output and "chain_anomaly" in result.output


def test_verify_with_a_bad_checkpoint_or_key_file_is_a_one_line_error(env: Env, tmp_path: Path) -> None:
    load_or_create_signing_key(env.var_dir / "audit-signing.key")
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    # A usage error (exit 2), found before the chain is walked: 1 is tampering's status (h11 #11).
    result = env.run("verify", "--checkpoint", str(bad))
    assert result.exit_code == 2 and result.output.startswith("Error: --checkpoint: a checkpoint is a JSON object")
    assert len(result.output.strip().splitlines()) == 1, result.output
    result = env.run("verify", "--public-key", str(bad))
    assert result.exit_code == 2 and "Error: --public-key: " in result.output and "neither PEM nor a hex" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    env.append(1)
    made = CheckpointStore(env.engine).make(key)
    assert made is not None
    for seq in (2**63, 2**64 + 5):  # past a database's integers: a traceback (OverflowError) before (probe s59 F7)
        bad.write_text(json.dumps({**made[0].to_document(key.public), "seq": seq}))
        result = env.run("verify", "--checkpoint", str(bad))
        assert result.exit_code == 2 and result.output.strip() == (
            f"Error: --checkpoint: checkpoint 'seq' must be an integer from 1 to {2**63 - 1} and 'closing' a "
            "boolean"), result.output


def test_verify_reports_a_broken_chain_and_the_checkpoints_both(env: Env) -> None:
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    head = env.append(3)
    CheckpointStore(env.engine).make(key)
    env.raw.without_guards("UPDATE audit_entries SET hash = :h WHERE seq = :seq", params={"h": "0" * 64, "seq": head})
    result = env.run("verify")
    assert result.exit_code == 1
    assert f"BROKEN at seq {head}" in result.output and "checkpoints TAMPERED" in result.output


def _rewrite_from(env: Env, seq: int) -> None:
    """Entry ``seq``'s body forged and every hash from it to the head recomputed, as anyone with the database can."""
    prev = env.store.get(seq - 1).hash  # type: ignore[union-attr]
    body = "CAST(:b AS json)" if env.raw.backend == "postgresql" else ":b"
    for at in range(seq, env.store.head().seq + 1):
        doc = env.store.get(at).to_document()  # type: ignore[union-attr]
        if at == seq:
            doc["body"] = {**doc["body"], "forged": True}
        doc["prev_hash"] = prev
        doc["hash"] = prev = document_hash(doc)
        env.raw.without_guards(f"UPDATE audit_entries SET body = {body}, prev_hash = :p, hash = :h WHERE seq = :seq",
                               params={"b": canonical_text(doc["body"]), "p": doc["prev_hash"], "h": doc["hash"],
                                       "seq": at})


@pytest.mark.parametrize("command", ["checkpoint", "export-bundle"])
def test_signing_over_a_rewritten_chain_is_refused(env: Env, tmp_path: Path, command: str) -> None:
    """A stored checkpoint contradicts the chain (rewritten below it): signing the head would vouch for the rewrite."""
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    signed = env.append(4)
    CheckpointStore(env.engine).make(key)
    _rewrite_from(env, 3)
    head = env.append(1)
    assert verify_chain(env.store).ok and head == signed + 1  # the chain itself holds: only the checkpoint tells
    out = tmp_path / "out"
    out.mkdir()
    result = env.run(command, "--out", str(out / "signed.json"))
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: refusing to sign: the stored checkpoint of entry {signed} no longer "
                                     "matches the chain (rewritten or cut below it); run `govgate audit verify`")
    assert list(out.iterdir()) == []
    assert [cp.seq for cp, _ in CheckpointStore(env.engine).with_entry_hashes()] == [signed]  # nothing signed


def test_a_checkpoint_file_that_cannot_be_written_is_one_line_saying_the_checkpoint_is_stored(env: Env) -> None:
    load_or_create_signing_key(env.var_dir / "audit-signing.key")
    head = env.append(2)
    result = env.run("checkpoint", "--out", "/nonexistent/dir/cp.json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write checkpoint file /nonexistent/dir/cp.json")
    assert f"the checkpoint of entry {head} is stored" in lines[0] and "another --out" in lines[0]
    assert CheckpointStore(env.engine).latest().seq == head  # stored: a second run only writes its file
    assert f"checkpoint of entry {head} (already checkpointed" in env.run("checkpoint").output


@pytest.mark.parametrize("age, shown", [("nan", "nan"), ("NaN", "nan"), ("inf", "inf"), ("1e999", "inf")])
def test_verify_refuses_a_max_unsigned_age_that_is_not_a_finite_number(env: Env, age: str, shown: str) -> None:
    """Compared with NaN or infinity an unsigned tail is never too old (``inf`` was taken: probe s56 C)."""
    result = env.run("verify", "--max-unsigned-age", age)
    assert result.exit_code == 2
    assert f"Invalid value for '--max-unsigned-age': must be a finite number of seconds, not {shown}" \
        in result.output


def test_verify_exits_1_on_a_payload_erased_outside_prune(env: Env) -> None:
    load_or_create_signing_key(env.var_dir / "audit-signing.key")
    kept = env.store.append("request", "r-text", principal="alice", team=None, model="tiny", body={"i": 0},
                            payload={"messages": [{"role": "user", "content": "hello"}]}, policy_revision=None)
    env.run("checkpoint")
    clean = env.run("verify")
    assert clean.exit_code == 0 and "erasures: every erased payload is recorded (0 payloads_erased" in clean.output
    env.raw.execute(f"UPDATE audit_entries SET payload = NULL WHERE seq = {kept.seq}")  # the guards allow it
    result = env.run("verify")
    assert result.exit_code == 1, result.output
    assert "chain intact" in result.output and f"PAYLOADS ERASED UNRECORDED: 1 entries" in result.output
    assert f"(seq {kept.seq})" in result.output


def test_verify_without_any_key_names_the_setting_and_says_unchecked_not_tampered(env: Env, tmp_path: Path) -> None:
    """A signing-key file that is not there reported "checkpoints TAMPERED" without naming the variable (probe
    s56). Still exit 1: a log whose key was taken away must not pass; a rewrite is still TAMPERED."""
    key = load_or_create_signing_key(tmp_path / "elsewhere.key")
    env.append(2)
    CheckpointStore(env.engine).make(key)
    env.env["GOVGATE_AUDIT_SIGNING_KEY_FILE"] = str(tmp_path / "missing.key")
    result = env.run("verify")
    assert result.exit_code == 1, result.output
    assert "checkpoints UNCHECKED: 1 stored" in result.output and "TAMPERED" not in result.output
    assert f"GOVGATE_AUDIT_SIGNING_KEY_FILE={tmp_path / 'missing.key'} does not exist" in result.output
    assert "--public-key" in result.output
    env.raw.without_guards("UPDATE audit_checkpoints SET head_hash = 'ab' || substr(head_hash, 3)")
    rewritten = env.run("verify")
    assert rewritten.exit_code == 1 and "checkpoints TAMPERED" in rewritten.output, rewritten.output


@pytest.mark.parametrize("command", ["checkpoint", "export-bundle"])
def test_entries_written_after_a_closing_checkpoint_are_not_signed_by_a_command(env: Env, tmp_path: Path,
                                                                                monkeypatch, command: str) -> None:
    """Entries appended while no gateway ran (after its closing checkpoint) are what a gateway's start names in a
    chain_anomaly; a scheduled ``audit checkpoint`` (or ``export-bundle``, which signs the head first) signed
    them, verify then passed and the start recorded nothing (probe s59 F1)."""
    import audit.checkpoint_check as checkpoint_check

    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    closed = env.append(3)
    CheckpointStore(env.engine).make(key, closing=True)  # the gateway stopped
    head = env.append(2)  # written while none ran
    out = tmp_path / "out"
    out.mkdir()
    young = env.run(command, "--out", str(out / "signed"))  # a gateway that has just started signs them itself
    assert young.exit_code == 1 and "try again in a few seconds" in young.output, young.output
    monkeypatch.setattr(checkpoint_check, "CLOSING_GRACE_S", 0.0)
    result = env.run(command, "--out", str(out / "signed"))
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: refusing to sign: entries {closed + 1}..{head} follow the closing checkpoint of entry {closed} (a "
        "gateway's stop): they were written while no gateway ran. A gateway's next start names them in a "
        "chain_anomaly entry and then signs them; `govgate audit verify` shows them")
    assert list(out.iterdir()) == []
    assert CheckpointStore(env.engine).latest().seq == closed  # nothing signed


@pytest.mark.parametrize("command", ["checkpoint", "export-bundle"])
def test_signing_over_a_chain_only_a_closing_mark_contradicts_is_refused(env: Env, tmp_path: Path,
                                                                         command: str) -> None:
    """The chain rewritten above its last checkpoints, which were deleted; the closing mark (a stop over a signed
    head, kept by its guard) still signs the old head: signing now vouched for the rewrite (probe s59 F2)."""
    key = load_or_create_signing_key(env.var_dir / "audit-signing.key")
    signed = env.append(4)
    store = CheckpointStore(env.engine)
    store.make(key)
    store.make(key, closing=True)  # an idle gateway's stop: a closing mark over the signed head
    assert [mark.seq for mark, _ in store.closing_marks()] == [signed]
    _rewrite_from(env, 3)
    env.raw.without_guards("DELETE FROM audit_checkpoints")
    out = tmp_path / "out"
    out.mkdir()
    result = env.run(command, "--out", str(out / "signed"))
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: refusing to sign: the closing mark of entry {signed} (a gateway's "
                                     "stop) no longer matches the chain (rewritten or cut below it); run `govgate "
                                     "audit verify`")
    assert list(out.iterdir()) == [] and list(CheckpointStore(env.engine).with_entry_hashes()) == []
