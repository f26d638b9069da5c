"""Revoking a key ends the requests it has in flight, not only its next one (probe s56 B-F1).

Before, a revoked key's stream ran on for as long as its model generated, and its queued request was served
35 s after the revocation. Now each is ended with 401 ``invalid_api_key`` (a stream: that error event in its
place), each with exactly one terminal entry that names the revocation; another key's requests go on.

Real parts: ``govgate serve`` with a worker of its own on a Redis of its own, the suite's database, and
``govgate keys revoke`` in its own process (its signal is the one the gateway acts on). The worker is held
with SIGSTOP so that the requests are surely still in flight when the key is revoked, and let go after, as
the drain's tests do (``tests/e2e/test_drain.py``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import httpx
import pytest

from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.processes import stop_process
from govgate.supervisor import child_env
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import wait_for_a_generation
from tests.e2e.test_drain import MODEL, _pids, _signal, _stream
from tests.e2e.test_stream_faults import wait_terminal
from tests.gateway.test_fail_closed import queued
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.jobs import KEY_REVOKED_MESSAGE


@pytest.fixture
def own(own_redis):  # noqa: F811
    return own_redis.with_(output_holdback_chars=16, request_timeout_s=120)


@pytest.fixture
def store(own):
    made = KeyStore(open_database(own))
    yield made
    made.engine.dispose()


def revoke(own, key_id: str) -> None:
    done = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "revoke", key_id],
                          env=child_env(own, own.redis_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # the signal reached the gateway


def until_queued(own, count: int) -> None:
    deadline = time.monotonic() + 60
    while queued(own, MODEL) < count:
        assert time.monotonic() < deadline, f"never {count} jobs queued"
        time.sleep(0.05)


@contextlib.contextmanager
def worker_and_gateway(own, tmp_path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A served gateway and a worker of its own; with them, what holds the worker (SIGSTOP) and lets it go.
    The worker is let go and stopped at the end, whatever happened."""
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    held: list[int] = []

    def hold() -> None:
        held[:] = _pids(worker)
        _signal(held, signal.SIGSTOP)

    try:
        wait_for_worker(own.redis_url, MODEL, worker)
        with serving(own, tmp_path / "serve.log") as base:
            yield base, hold, lambda: _signal(held, signal.SIGCONT)
    finally:
        _signal(held, signal.SIGCONT)
        stop_process(worker, timeout_s=30)


def completion(base: str, secret: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers=bearer(secret), timeout=120,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


@pytest.mark.parametrize("cache_ttl_s", [30.0, 0.0], ids=["cache-on", "cache-off"])
def test_a_revoked_key_s_stream_and_queued_request_end_at_once_and_another_key_s_go_on(
        own, store, audit_store, tmp_path, cache_ttl_s) -> None:
    """With the principal cache off too: the key-change listener still runs, for the requests in flight."""
    own = own.with_(auth_cache_ttl_s=cache_ttl_s)
    leaked = store.create("lee", team="ops", roles=["admin"])
    other = store.create("olga", team="ops", roles=["admin"]).secret
    with worker_and_gateway(own, tmp_path) as (base, hold, let_go), ThreadPoolExecutor(3) as pool:
        started = threading.Event()
        streamed = pool.submit(_stream, base, leaked.secret, started)
        assert started.wait(60), "the stream never received text"
        hold()  # mid-generation: the stream stays in flight, the others queue
        waiting = pool.submit(completion, base, leaked.secret, "Count", 5)
        until_queued(own, 1)
        others = pool.submit(completion, base, other, "Count", 5)
        until_queued(own, 2)

        revoke(own, leaked.key.key_id)
        refused = waiting.result(timeout=30)  # at once, with the worker still held
        stream = streamed.result(timeout=30)
        assert not others.done()  # another key's request still waits for the worker
        assert queued(own, MODEL) == 1  # the revoked key's job was taken back from the queue
        let_go()
        served = others.result(timeout=60)
        after = completion(base, leaked.secret, "Again", 5)

        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "revoked while the request was in flight" in refused.json()["error"]["message"]
        assert stream["text"] and not stream["done"]
        assert stream["last"]["error"]["code"] == "invalid_api_key", stream["last"]
        assert served.status_code == 200, served.text
        assert after.status_code == 401 and after.json()["error"]["code"] == "invalid_api_key"

        # each ends once, the end naming the revocation; the stream's (its worker's, let go) says what the
        # client received
        queued_id = refused.headers["x-govgate-request-id"]
        queued_end = wait_terminal(audit_store, queued_id)
        assert queued_end.kind == "cancelled"
        assert queued_end.body["error"] == {
            "code": "cancelled", "message": "the request's API key was revoked before a worker took the request"}
        stream_end = wait_terminal(audit_store, stream["request_id"])
        assert stream_end.kind == "cancelled", stream_end.body
        assert KEY_REVOKED_MESSAGE in stream_end.body["error"]["message"]
        assert stream_end.payload["client_output"] == stream["text"]
        for request_id in (queued_id, stream["request_id"]):
            assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
        assert audit_store.terminal_for(served.headers["x-govgate-request-id"]).kind == "completion"


@pytest.mark.parametrize("how", ["cli", "http"])
def test_a_revoked_key_s_running_request_is_answered_401_and_its_worker_records_why(
        own, store, audit_store, tmp_path, how) -> None:
    """A non-streamed request whose worker generates (held, so deaf to the cancel key for now): answered 401
    after the grace a worker gets to stop, and its worker, let go, records the revocation's end. Revoked by
    the CLI, or over HTTP on the gateway that runs the request (``POST /admin/keys/{key_id}/revoke``)."""
    own = own.with_(output_rules=False)
    leaked = store.create("lou", team="ops", roles=["admin"])
    admin = store.create("ada", team="ops", roles=["admin"]).secret
    with worker_and_gateway(own, tmp_path) as (base, hold, let_go), ThreadPoolExecutor(1) as pool:
        running = pool.submit(completion, base, leaked.secret, "Tell", 3000)
        request_id = wait_for_a_generation(own.redis_url, timeout_s=60)
        assert request_id is not None, "no generation began"
        hold()
        if how == "cli":
            revoke(own, leaked.key.key_id)
        else:
            done = httpx.post(f"{base}/admin/keys/{leaked.key.key_id}/revoke", headers=bearer(admin),
                              timeout=30)
            assert done.status_code == 200 and done.json()["gateways_told"] is True, done.text
        answered = running.result(timeout=60)
        let_go()
        assert answered.status_code == 401, answered.text
        assert answered.json()["error"]["code"] == "invalid_api_key"
        assert answered.headers["x-govgate-request-id"] == request_id
        end = wait_terminal(audit_store, request_id)  # the worker, let go, stops at the cancel key
        assert end.kind == "cancelled", end.body
        assert end.body["error"]["message"] == KEY_REVOKED_MESSAGE
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
