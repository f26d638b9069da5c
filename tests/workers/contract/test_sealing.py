"""Sealed payloads and the key files behind them (workers/contract/sealing.py, the contract's sealed forms)."""

from __future__ import annotations

import base64
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from workers.contract.jobs import GenerateJob, JobResult, open_piece, open_result, seal_piece
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import SealError, Sealer, load_or_create_key

SECRET = "the launch code is swordfish"


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_sealed_token_round_trips_and_holds_no_clear_text() -> None:
    sealer = Sealer(bytes(range(32)))
    token = sealer.seal(SECRET.encode())
    assert SECRET.encode() not in token and b"swordfish" not in token
    assert sealer.unseal(token) == SECRET.encode()
    assert sealer.seal(SECRET.encode()) != token  # a fresh nonce every time


@pytest.mark.parametrize("spoil", [
    lambda t: t[:-1] + bytes([t[-1] ^ 1]),          # tag altered
    lambda t: t[:14] + bytes([t[14] ^ 0x80]) + t[15:],  # ciphertext altered
    lambda t: bytes([t[0] ^ 1]) + t[1:],            # nonce altered
    lambda t: t[:20],                               # truncated
    lambda t: b"",
], ids=["tag", "ciphertext", "nonce", "truncated", "empty"])
def test_a_tampered_token_is_refused(spoil) -> None:
    sealer = Sealer(bytes(range(32)))
    with pytest.raises(SealError):
        sealer.unseal(spoil(sealer.seal(SECRET.encode())))


def test_another_keys_token_is_refused() -> None:
    token = Sealer(bytes(32)).seal(SECRET.encode())
    with pytest.raises(SealError):
        Sealer(bytes([1]) * 32).unseal(token)
    with pytest.raises(SealError):
        Sealer(bytes(32)).unseal_text("not base64 at all!")


def test_a_key_file_is_created_private_once_and_then_reused(tmp_path) -> None:
    path = tmp_path / "var" / "keys" / "payload.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert load_or_create_key(path) == key
    assert base64.b64decode(path.read_text()) == key
    assert [p.name for p in path.parent.iterdir()] == ["payload.key"]  # no temporary left behind


def test_processes_starting_together_agree_on_one_key(tmp_path) -> None:
    path = tmp_path / "keys" / "shared.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(path), range(32)))
    assert len(keys) == 1


def test_an_unusable_key_file_is_an_error_not_a_new_key(tmp_path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match="base64"):
        load_or_create_key(path)
    path.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="bytes"):
        load_or_create_key(path)


def test_a_job_travels_sealed_with_only_ids_in_clear() -> None:
    sealer = Sealer(bytes(range(32)))
    job = GenerateJob(request_id="r1", model="tiny", endpoint="chat.completions", params=SamplingParams(max_tokens=2),
                      principal="alice", team="research", policy_revision="rev",
                      messages=[{"role": "user", "content": SECRET}], prompt_logging="hash",
                      redact=[{"detector": "email", "text": "ann@example.org"}])
    payload = job.sealed(sealer)
    assert set(payload) == {"request_id", "model", "reply_to", "sealed"}  # the reply channel names a gateway process
    assert "swordfish" not in str(payload) and "ann@example.org" not in str(payload)
    assert GenerateJob.unsealed(payload, sealer) == job
    with pytest.raises(SealError):  # a sealed job moved to another request's id
        GenerateJob.unsealed({**payload, "request_id": "r2"}, sealer)


def test_results_and_pieces_are_sealed_and_an_unsealed_result_cannot_carry_text() -> None:
    sealer = Sealer(bytes(range(32)))
    result = JobResult(status="completed", text=SECRET, completion_tokens=5, audit_seq=3)
    stored = result.sealed(sealer)
    assert "swordfish" not in str(stored)
    assert JobResult.from_payload(open_result(stored, sealer)) == result
    forged = open_result({"status": "completed", "text": "served by a forger"}, sealer)
    assert forged["status"] == "failed" and "text" not in forged
    assert open_result({"status": "completed", "sealed": "AAAA"}, sealer)["status"] == "failed"
    piece = seal_piece(sealer, 0, SECRET)
    assert "swordfish" not in piece and open_piece(sealer, piece) == SECRET


def test_key_files_default_under_var_and_reach_child_processes_spelled_out(tmp_path) -> None:
    from gateway.settings import Settings

    settings = Settings.from_env({"GOVGATE_VAR_DIR": str(tmp_path / "var")})
    assert settings.effective_payload_key_file == tmp_path / "var" / "keys" / "payload.key"
    assert settings.effective_digest_key_file == tmp_path / "var" / "keys" / "digest.key"
    env = settings.to_env()
    assert Settings.from_env(env).effective_payload_key_file == settings.effective_payload_key_file
    given = Settings.from_env({"GOVGATE_PAYLOAD_KEY_FILE": str(tmp_path / "secrets" / "p.key"),
                               "GOVGATE_DIGEST_KEY_FILE": str(tmp_path / "secrets" / "d.key")})
    assert given.to_env()["GOVGATE_PAYLOAD_KEY_FILE"] == str(tmp_path / "secrets" / "p.key")
    assert given.effective_digest_key_file == tmp_path / "secrets" / "d.key"


def test_a_worker_with_an_unusable_key_file_stops_with_a_message(settings, tmp_path) -> None:
    from click.testing import CliRunner

    from govgate.cli import main
    from govgate.supervisor import child_env
    from workers.contract.registry import TINY_MODEL_NAME

    bad = tmp_path / "payload.key"
    bad.write_text("not a key\n")
    own = settings.with_(payload_key_file=str(bad), database_url=f"sqlite:///{tmp_path / 'w.db'}")
    result = CliRunner().invoke(main, ["worker", "--model", TINY_MODEL_NAME], env=child_env(own, own.redis_url),
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert f"key file {bad} does not hold a base64 key" in result.output
    assert bad.read_text() == "not a key\n"  # never replaced behind the operator's back
