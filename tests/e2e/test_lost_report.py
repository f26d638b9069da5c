"""A handed-over output whose report is lost with the gateway's pub/sub connection ends at once, not at the timeout.

A Redis, a tiny-model worker and a served gateway of their own. The loss is
made deterministic with signals: the worker is held while the request is
queued; the gateway is then frozen and its subscriptions killed (CLIENT
KILL), the worker let go, so its report is published to nobody while its
fallback waits in the pending terminals; then the gateway is let go, finds
its connection gone, reconnects, and must find the fallback. The request
timeout and the worker's verdict timeout are both long: an answer before
them can only come from the recovery, and the client's own timeout (half
the request timeout) fails the test otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from tests.conftest import _roomy_limits, bearer, policy_copy, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import pool_children
from tests.keys_and_limits import new_key
from workers.contract.jobs import queue_for
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.registry import TINY_MODEL_NAME

#: Neither the gateway's timeout nor the fallback's (the worker's verdict timeout) may end the request.
REQUEST_TIMEOUT_S = 120.0
#: A role whose outputs are logged only as a digest: its fallback cannot be judged in the report's place.
HUSHED = "hushed"


def hushed_role(config: dict) -> None:
    _roomy_limits(config)
    config["roles"][HUSHED] = {"models": ["*"], "max_tokens": 64, "prompt_logging": "hash"}


@dataclass
class Parts:
    settings: object
    base: str
    worker: object
    redis: redis.Redis


@pytest.fixture(scope="module")
def parts(settings, tmp_path_factory) -> Iterator[Parts]:
    folder = tmp_path_factory.mktemp("lost-report")
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-lr-"))
    server = RedisProcess.start(redis_dir, persist=False)
    own = settings.with_(redis_url=server.url, request_timeout_s=REQUEST_TIMEOUT_S,
                         output_verdict_timeout_s=REQUEST_TIMEOUT_S, policy_dir=policy_copy(folder, hushed_role))
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=folder / "worker.log")
    client = redis.Redis.from_url(server.url)
    try:
        with serving(own, folder / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            yield Parts(own, base, worker, client)
    finally:
        client.close()
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_until(check, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def queued(client: redis.Redis) -> bool:
    """Whether a job waits in one of the model's queues (fifo or fair: every list named after it)."""
    return any(client.llen(key) for key in client.scan_iter(match=f"{queue_for(TINY_MODEL_NAME)}*", _type="list"))


def publishes(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


def kill_subscriptions(client: redis.Redis) -> int:
    """Kill the connections subscribed to channels (the gateway's; the worker's pub/sub uses patterns)."""
    subscribed = [c for c in client.client_list(_type="pubsub") if int(c.get("sub", 0)) > 0]
    for connection in subscribed:
        client.client_kill_filter(_id=connection["id"])
    return len(subscribed)


def ask_with_lost_report(parts: Parts, key: str) -> tuple[str, httpx.Response]:
    """One non-streamed request whose worker's report is published while its gateway cannot hear it."""
    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{parts.base}/v1/completions", headers=bearer(key), timeout=REQUEST_TIMEOUT_S / 2,
                json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    worker = [parts.worker.pid, *pool_children(parts.worker.pid)]
    gateway = parts.base.process.pid
    asker = threading.Thread(target=ask)
    signal_all(worker, signal.SIGSTOP)
    try:
        asker.start()
        wait_until(lambda: queued(parts.redis), "the job was never queued")
        signal_all([gateway], signal.SIGSTOP)
        assert kill_subscriptions(parts.redis) >= 1
        before = publishes(parts.redis)
        signal_all(worker, signal.SIGCONT)
        wait_until(lambda: parts.redis.hlen(PENDING_KEY) == 1 and publishes(parts.redis) > before,
                   "the worker never handed the output over")
    finally:
        signal_all(worker, signal.SIGCONT)
        signal_all([gateway], signal.SIGCONT)
    asker.join(REQUEST_TIMEOUT_S)
    assert "error" not in outcome, outcome  # answered well before the request timeout
    return outcome["response"].headers["x-govgate-request-id"], outcome["response"]


def test_a_lost_report_is_judged_from_its_fallback_and_answered(parts, keyring, audit_store):
    request_id, response = ask_with_lost_report(parts, keyring["admin"])
    assert response.status_code == 200, response.text
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]
    terminal = entries[1]
    # Judged and recorded by the gateway, as if the report had come: the output decision, what was served.
    assert "output_decision" in terminal.body and "handed_over_ms" in terminal.body["timings"]
    assert terminal.payload["client_output"] == response.json()["choices"][0]["text"]
    assert terminal.payload["output"] == terminal.payload["client_output"]
    assert terminal.body["usage"]["completion_tokens"] == response.json()["usage"]["completion_tokens"] == 12
    assert "recorded_late" not in terminal.body  # not the fallback written
    wait_until(lambda: not parts.redis.hexists(PENDING_KEY, request_id), "the fallback dropped (in a batch)", 10)


def test_a_lost_report_whose_fallback_logs_only_a_digest_is_judged_from_the_report_kept_beside_it(
        parts, audit_store):
    key = new_key(parts.settings, f"hush-{uuid.uuid4().hex[:8]}", "quiet", roles=(HUSHED,))
    request_id, response = ask_with_lost_report(parts, key)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]
    terminal = entries[1]
    assert "output_decision" in terminal.body and "recorded_late" not in terminal.body
    assert terminal.body["usage"]["completion_tokens"] == 12 and "output_hmac_sha256" in terminal.body
    assert text and not (terminal.payload or {}).get("output")  # the log keeps the digest, as it promised
    wait_until(lambda: not parts.redis.hexists(PENDING_KEY, request_id), "the fallback dropped (in a batch)", 10)
