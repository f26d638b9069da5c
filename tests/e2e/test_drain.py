"""A stopping gateway drains: new requests are refused 503, those in flight get ``GOVGATE_DRAIN_S``, then the
rest are ended with an answer, each with exactly one terminal entry that says what its client received (h9 F3, F4).

Before, SIGTERM let uvicorn wait for open connections until ``govgate up`` killed the API after 15 s: a
queued request got no HTTP answer ("Server disconnected"), a stream was cut with neither an error event nor
``[DONE]``, and the stream's entry, written by its worker, said "neither checked nor served" though its client
had been streamed judged text.

Real parts: ``govgate serve`` (uvicorn) with a short drain, a worker of its own on a Redis of its own (held
with SIGSTOP so that the requests are surely still in flight when the drain ends), the suite's database.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from govgate.processes import stop_process
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_stream_faults import wait_terminal
from tests.e2e.test_timeout_charges import Freezer, freezer
from tests.gateway.test_fail_closed import queued
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
#: The test's drain: long enough to see a new request refused during it, short to keep the suite quick.
DRAIN_S = 3.0


def _pids(process) -> list[int]:
    """A worker and its children (a prefork pool's processes), to hold and let go together."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    return [process.pid, *map(int, children.read_text().split())] if children.exists() else [process.pid]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _until_stopping(base: str) -> httpx.Response:
    """``/readyz``'s answer once it says the gateway is stopping (a 503 alone may be the held worker's)."""
    deadline = time.monotonic() + 30
    while True:
        reply = httpx.get(f"{base}/readyz", timeout=5)
        body = reply.json()
        if reply.status_code == 503 and body["checks"]["gateway"] != "ok":
            return reply
        assert time.monotonic() < deadline, f"/readyz never said the gateway is stopping: {body}"
        time.sleep(0.05)


def _stream(base: str, key: str, started: threading.Event) -> dict:
    """A long stream; ``started`` is set once judged text reached the client. Returns what it received."""
    text, events, done = "", [], False
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={"model": MODEL, "prompt": "Tell", "max_tokens": 3000, "temperature": 0,
                            "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            events.append(event)
            if event.get("choices"):
                text += event["choices"][0].get("text") or ""
                if text:
                    started.set()
    return {"request_id": request_id, "text": text, "last": events[-1] if events else None, "done": done}


def test_a_stopped_gateway_refuses_new_requests_and_ends_those_in_flight_with_an_answer(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    # a drain long enough for uvicorn's Date header to be seen renewed within it
    own = own_redis.with_(drain_s=DRAIN_S + 4, output_holdback_chars=16, request_timeout_s=120)
    key = keyring["admin"]
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    held: list[int] = []
    try:
        wait_for_worker(own.redis_url, MODEL, worker)
        with serving(own, tmp_path / "serve.log") as base, ThreadPoolExecutor(2) as pool:
            started = threading.Event()
            streamed = pool.submit(_stream, base, key, started)
            assert started.wait(60), "the stream never received text"
            held = _pids(worker)
            _signal(held, signal.SIGSTOP)  # mid-generation: the stream stays in flight
            plain = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(key), timeout=120,
                                json={"model": MODEL, "prompt": "Count", "max_tokens": 5})
            deadline = time.monotonic() + 60
            while queued(own, MODEL) < 1:  # the non-streamed request waits behind the held stream
                assert time.monotonic() < deadline, "the non-streamed request was never queued"
                time.sleep(0.05)

            base.process.send_signal(signal.SIGTERM)
            first = _until_stopping(base)
            ready, seen = first.json(), time.monotonic()
            refused = httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=30,
                                 json={"model": MODEL, "prompt": "Late", "max_tokens": 5})
            time.sleep(max(0.0, seen + 3 - time.monotonic()))
            later = httpx.get(f"{base}/readyz", timeout=5)  # still within the drain
            answered = plain.result(timeout=60)
            stream = streamed.result(timeout=60)
            assert base.process.wait(timeout=60) is not None  # it stops within its drain and a few seconds
        _signal(held, signal.SIGCONT)

        assert "gateway" in ready["missing"] and "stopping" in ready["checks"]["gateway"], ready
        # uvicorn's Date header goes on being renewed while the stop runs (it stayed at the drain's first second)
        assert later.status_code == 503 and later.json()["checks"]["gateway"] != "ok", later.text
        assert (parsedate_to_datetime(later.headers["date"]) - parsedate_to_datetime(first.headers["date"])
                ).total_seconds() >= 1, (first.headers["date"], later.headers["date"])
        # a request sent during the drain: refused at once, told when to come back, and recorded
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"]
        refused_id = refused.headers["x-govgate-request-id"]
        rejected = [e for e in audit_store.entries_for(refused_id)]
        assert [e.kind for e in rejected] == ["rejected"]
        assert rejected[0].body["error"]["code"] == "shutting_down"
        # the queued non-streamed request: a 503 in OpenAI's shape, not a cut connection
        assert answered.status_code == 503, answered.text
        assert answered.json()["error"]["code"] == "shutting_down"
        assert answered.headers["retry-after"]
        plain_id = answered.headers["x-govgate-request-id"]
        # the stream: an error event in its place, no [DONE]
        assert stream["text"] and not stream["done"]
        assert stream["last"]["error"]["code"] == "shutting_down", stream["last"]

        # Each ends exactly once; the stream's entry (its worker's, once let go) says what the client received.
        plain_end = wait_terminal(audit_store, plain_id)
        assert plain_end.kind == "cancelled" and "gateway stopped" in plain_end.body["error"]["message"]
        stream_end = wait_terminal(audit_store, stream["request_id"])
        assert stream_end.kind == "cancelled", stream_end.body.get("error")
        assert stream_end.payload["client_output"] == stream["text"]
        assert stream_end.payload["output"].startswith(stream["text"])  # nothing in it was masked
        assert stream_end.body["output_decision"]["allow"] is True
        for request_id in (plain_id, stream["request_id"]):
            assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
    finally:
        _signal(held, signal.SIGCONT)
        stop_process(worker, timeout_s=30)


def test_requests_that_finish_within_the_drain_are_answered_and_the_stop_does_not_wait_it_out(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """The drain is a bound, not a wait: a request in flight when the stop comes is served whole once its
    worker answers, and the gateway exits as soon as nothing is left (well before its 60 s drain)."""
    own = own_redis.with_(drain_s=60.0, request_timeout_s=120)
    key = keyring["admin"]
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    held: list[int] = []
    try:
        wait_for_worker(own.redis_url, MODEL, worker)
        with serving(own, tmp_path / "serve.log") as base, ThreadPoolExecutor(1) as pool:
            held = _pids(worker)
            _signal(held, signal.SIGSTOP)  # the request stays queued until the stop has begun
            plain = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(key), timeout=120,
                                json={"model": MODEL, "prompt": "Count", "max_tokens": 5})
            deadline = time.monotonic() + 60
            while queued(own, MODEL) < 1:
                assert time.monotonic() < deadline, "the request was never queued"
                time.sleep(0.05)
            base.process.send_signal(signal.SIGTERM)
            _until_stopping(base)
            _signal(held, signal.SIGCONT)
            answered = plain.result(timeout=60)
            base.process.wait(timeout=50)  # long before the drain's 60 s: nothing was left to wait for
        assert answered.status_code == 200, answered.text
        request_id = answered.headers["x-govgate-request-id"]
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "completion"]
        assert "ended now" not in (tmp_path / "serve.log").read_text()  # the drain never had to cut
    finally:
        _signal(held, signal.SIGCONT)
        stop_process(worker, timeout_s=30)


def _upload_start(base: str, key: str) -> socket.socket:
    """A raw connection that sent a completion request's headers and the first bytes of its body, no more:
    a client still uploading its body (a slow link, a large prompt) when the gateway is told to stop."""
    body = json.dumps({"model": MODEL, "prompt": "x" * 4000, "max_tokens": 5}).encode()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=30)
    client.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
    return client


def test_a_request_whose_body_is_still_arriving_is_refused_at_the_stop_and_does_not_hold_it(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """Not admitted yet, such a request has nothing running to finish: the stop refuses it at once (503
    ``shutting_down`` in OpenAI's shape, recorded ``rejected``) instead of waiting out the drain for it.

    Before (probe p1 F2), it counted as in flight from before its body was read: the drain waited its whole
    ``GOVGATE_DRAIN_S`` for it, the cut could not end it, and uvicorn finally cancelled it: a plain-text
    500 and a ``CancelledError`` traceback in the log. The drain here (60 s) is longer than the test waits
    for the answer and the exit (30 s each), so only a stop that does not wait for the upload passes.
    """
    own = own_redis.with_(drain_s=60.0)
    log = tmp_path / "serve.log"
    with serving(own, log) as base:
        client = _upload_start(base, keyring["admin"])
        try:
            time.sleep(0.5)  # lets the request reach its body's read (one that comes later is refused too)
            base.process.send_signal(signal.SIGTERM)
            response = http.client.HTTPResponse(client)
            response.begin()  # the socket's 30 s timeout bounds the wait
            body = json.loads(response.read())
        finally:
            client.close()
        assert base.process.wait(timeout=30) is not None  # long before its 60 s drain would have ended
    assert response.status == 503, body
    assert response.getheader("content-type", "").startswith("application/json")
    assert body["error"]["code"] == "shutting_down", body
    assert response.getheader("retry-after")
    request_id = response.getheader("x-govgate-request-id")
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["rejected"]
    assert entries[0].body["error"]["code"] == "shutting_down"
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


def test_a_forced_stop_answers_a_request_waiting_for_its_policy_decision_and_records_it(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """A second stop signal ends at once a request whose policy decision is still being awaited: 503
    ``shutting_down`` in OpenAI's shape, recorded ``rejected`` (it was not admitted).

    Before (probe q1 F1), the cut had nothing to end a request in admission with, and a forced stop did not
    wait for the ended requests' answers: the client's connection was closed with no response at all, and
    nothing was recorded for a request that had been authenticated and read. The policy here takes minutes
    on a prompt that says "slow" and the drain is 60 s: only a stop that ends the wait passes.
    """
    from tests.e2e.test_policy_pool_api import slow_on_request_policy

    own = own_redis.with_(drain_s=60.0, policy_dir=slow_on_request_policy(tmp_path / "policy"),
                          policy_timeout_s=120.0, policy_wait_timeout_s=120.0, output_rules=False)
    log = tmp_path / "serve.log"
    with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                              json={"model": MODEL, "prompt": "slow please", "max_tokens": 5})
        time.sleep(1.0)  # lets the request reach its decision (one still being read is refused as well)
        base.process.send_signal(signal.SIGTERM)
        _until_stopping(base)
        base.process.send_signal(signal.SIGINT)  # the second signal: no drain, the requests are ended now
        answered = waiting.result(timeout=60)
        assert base.process.wait(timeout=60) is not None
    assert answered.status_code == 503, answered.text
    assert answered.json()["error"]["code"] == "shutting_down"
    assert answered.headers["retry-after"]
    request_id = answered.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["rejected"], [e.kind for e in entries]
    assert entries[0].body["error"]["code"] == "shutting_down"
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


def test_a_forced_stop_still_writes_the_closing_checkpoint(own_redis, tmp_path) -> None:  # noqa: F811
    """A second stop signal still signs the chain's head before the gateway exits: ``audit verify`` run while
    it is down finds nothing unsigned.

    Before (probe q1 F5), a forced stop skipped the app's shutdown and with it the closing checkpoint: the
    entries of its last seconds (here the queued request's ``cancelled``) stayed unsigned, and ``verify``
    reported "checkpoints TAMPERED" once they were older than the age limit, for an ordinary second Ctrl-C.
    """
    from audit.checkpoint_check import check_checkpoints
    from audit.checkpoints import CheckpointStore
    from audit.signing import load_signing_key

    from audit import AuditStore
    from gateway.db_setup import open_database
    from tests.keys_and_limits import new_key

    # A store of its own: another gateway of the suite on the shared one (the session's served API) signs a
    # checkpoint at once after a closing one, as a replica's successor does, and the latest is then not this one.
    own = own_redis.with_(drain_s=60.0, output_rules=False, checkpoint_interval_s=3600.0,
                          database_url=f"sqlite:///{tmp_path / 'own-audit.db'}")
    key = new_key(own, "closer", None, ("admin",))
    audit_store = AuditStore(open_database(own))
    # The key's entry signed before the start: else the gateway's first tick signs the head as soon as there is
    # one (no checkpoint yet), and on a busy machine that tick came after the ``cancelled``, leaving the
    # closing checkpoint nothing to sign (one per entry); the hour's interval keeps the loop quiet after it.
    from audit.signing import load_or_create_signing_key
    CheckpointStore(audit_store.engine).make(load_or_create_signing_key(own.effective_audit_signing_key_file))
    log = tmp_path / "serve.log"
    with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
        plain = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(key), timeout=60,
                            json={"model": MODEL, "prompt": "Count", "max_tokens": 5})
        deadline = time.monotonic() + 60
        while queued(own, MODEL) < 1:  # no worker: it waits in the queue
            assert time.monotonic() < deadline, "the request was never queued"
            time.sleep(0.05)
        base.process.send_signal(signal.SIGTERM)
        _until_stopping(base)
        base.process.send_signal(signal.SIGINT)
        answered = plain.result(timeout=60)
        assert base.process.wait(timeout=60) is not None
    assert answered.status_code == 503, answered.text
    request_id = answered.headers["x-govgate-request-id"]
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
    checkpoints = CheckpointStore(audit_store.engine)
    latest = checkpoints.latest()
    assert latest is not None and latest.closing and latest.seq == audit_store.head().seq
    key = load_signing_key(own.effective_audit_signing_key_file)
    verdict = check_checkpoints(checkpoints, key.public, strict=True, max_unsigned_age_s=0.0)
    assert verdict.ok and verdict.tail is None, verdict.problems
    assert "no closing audit checkpoint" not in log.read_text()
    audit_store.engine.dispose()


def test_an_idle_gateway_s_stop_closes_the_chain_and_a_key_made_while_it_is_down_is_signed(
        own_redis, tmp_path) -> None:  # noqa: F811
    """An idle gateway's last tick signed the head, so its stop had nothing to sign: "audit head already
    checkpointed; no closing checkpoint". ``govgate keys create`` run while it was down then found no closing
    checkpoint to follow, left its entry unsigned, and verify (after 50 s) and the next start (a
    ``chain_anomaly``) named the admin's routine act. The stop now leaves a closing mark over the head."""
    import subprocess
    import sys

    from audit.checkpoint_check import anomaly_at_start
    from audit.checkpoints import CheckpointStore

    from audit import AuditStore
    from gateway.db_setup import open_database
    from govgate.supervisor import child_env
    from tests.keys_and_limits import new_key

    own = own_redis.with_(checkpoint_interval_s=3600.0, database_url=f"sqlite:///{tmp_path / 'own-audit.db'}")
    new_key(own, "early", None, ("admin",))  # an entry for the start's first tick to sign
    audit_store = AuditStore(open_database(own))
    checkpoints = CheckpointStore(audit_store.engine)
    with serving(own, tmp_path / "serve.log") as base:
        deadline = time.monotonic() + 60
        while checkpoints.latest() is None:
            assert time.monotonic() < deadline, "the gateway never signed the head"
            time.sleep(0.05)
        signed = checkpoints.latest()
        base.process.send_signal(signal.SIGTERM)  # idle: nothing appended since that tick
        assert base.process.wait(timeout=60) is not None
    latest = checkpoints.latest()
    assert latest is not None and latest.seq == signed.seq and not signed.closing and latest.closing
    env = {**child_env(own, "redis://127.0.0.1:1/0")}  # the stack is down
    made = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "create", "--user", "later", "--role",
                           "analyst"], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    head = checkpoints.head()
    latest = checkpoints.latest()
    assert head is not None and latest is not None and latest.seq == head[0] == signed.seq + 1 and latest.closing
    assert anomaly_at_start(checkpoints, max_unsigned_age_s=0.0) is None
    audit_store.engine.dispose()


def test_a_forced_stop_answers_a_request_whose_worker_does_not_stop_in_time(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """A second stop signal ends a non-streamed request whose worker is generating and does not stop at the
    cancel key in time (held here; a long prompt's prefill does the same): 503 ``shutting_down`` at once.

    Before (probe q1 F1 (a)), the cut gave such a request 3 s for its worker's end, longer than the 2 s a
    forced stop waits for answers: the process ended first, and the client's connection closed with no
    response. Its worker, let go, records the end.
    """
    from tests.e2e.test_crash_safety import wait_for_a_generation

    own = own_redis.with_(drain_s=60.0, output_rules=False, request_timeout_s=120)
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    held: list[int] = []
    try:
        wait_for_worker(own.redis_url, MODEL, worker)
        log = tmp_path / "serve.log"
        with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(keyring["admin"]),
                                  timeout=60, json={"model": MODEL, "prompt": "Tell", "max_tokens": 3000})
            assert wait_for_a_generation(own.redis_url, timeout_s=60) is not None, "no generation began"
            held = _pids(worker)
            _signal(held, signal.SIGSTOP)  # generating, and deaf to the cancel key from now on
            base.process.send_signal(signal.SIGTERM)
            _until_stopping(base)
            base.process.send_signal(signal.SIGINT)  # the second signal: no drain, the requests are ended now
            answered = running.result(timeout=60)
            assert base.process.wait(timeout=60) is not None
        _signal(held, signal.SIGCONT)
        assert answered.status_code == 503, answered.text
        assert answered.json()["error"]["code"] == "shutting_down" and answered.headers["retry-after"]
        request_id = answered.headers["x-govgate-request-id"]
        end = wait_terminal(audit_store, request_id)  # the worker, let go, stops at the cancel key
        assert end.kind == "cancelled", end.body
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
        assert "Traceback" not in log.read_text()
    finally:
        _signal(held, signal.SIGCONT)
        stop_process(worker, timeout_s=30)


def test_a_graceful_stop_answers_a_refused_request_still_waiting_to_learn_whether_its_key_sees_the_model(
        own_redis, keyring, audit_store, settings, tmp_path) -> None:  # noqa: F811
    """A refusal is answered as an unknown model's when the key may not see the model, and the policy is
    asked that (``visible_models``) after its decision: that wait ends at the cut too (503
    ``shutting_down``, recorded ``rejected``). Before, it did not, and a slow ``visible_models`` left the
    request to uvicorn's graceful timeout, as a slow decision did (probe q1 F3): a plain-text 500, a
    traceback, no entry. The policy here denies at once a prompt that says "deny" and takes minutes to list
    the models of the key's team; the drain is 1 s."""
    from gateway.auth import KeyStore
    from gateway.components import open_database
    from tests.policy.embedded_fixtures import SLOW, write_policy

    deny = ('{"allow": false, "reasons": [{"code": "x", "message": "y"}], '
            '"obligations": {"max_tokens": 7, "prompt_logging": "full"}}')
    policy = write_policy(tmp_path / "policy", f"""{SLOW}
decision := {deny}

visible_models contains m.name if {{
	some m in input.models
	input.principal.team != "slowteam"
}}

visible_models contains m.name if {{
	some m in input.models
	input.principal.team == "slowteam"
	slow_count > 0
}}
""")
    store = KeyStore(open_database(settings))
    key = store.create("sloane", team="slowteam", roles=["analyst"]).secret
    store.engine.dispose()
    own = own_redis.with_(drain_s=1.0, policy_dir=policy, policy_timeout_s=120.0, policy_wait_timeout_s=120.0,
                          output_rules=False)
    log = tmp_path / "serve.log"
    with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(key), timeout=90,
                              json={"model": MODEL, "prompt": "deny me", "max_tokens": 5})
        time.sleep(1.0)  # lets the request reach the policy's visible_models (one still earlier is refused too)
        base.process.send_signal(signal.SIGTERM)
        answered = waiting.result(timeout=90)
        assert base.process.wait(timeout=60) is not None
    assert answered.status_code == 503, answered.text
    assert answered.json()["error"]["code"] == "shutting_down"
    request_id = answered.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["rejected"], [e.kind for e in entries]
    assert entries[0].body["error"]["code"] == "shutting_down"
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


@contextlib.contextmanager
def _stream_cut_by_a_stop(own, key: str, audit_store, tmp_path: Path, *, thaw_after_s: float = 0.0,
                          forced: bool = False) -> Iterator[tuple[str, dict, Freezer]]:
    """A served gateway on ``own`` with a worker of its own; a stream whose worker is frozen mid-generation,
    so that it stays in flight until the stop (SIGTERM; ``forced``: a second one once it is stopping) cuts
    it; the worker let go ``thaw_after_s`` after the cut set its cancel flag. Yields the request id, what the
    stream received and the freezer, once the gateway has exited; the worker is stopped after the block."""
    worker = spawn_cli(own, "worker", "--model", MODEL, log=tmp_path / "worker.log")
    try:
        wait_for_worker(own.redis_url, MODEL, worker)
        with serving(own, tmp_path / "serve.log") as base, ThreadPoolExecutor(1) as pool, \
                freezer(own, worker) as frozen:
            head = audit_store.head().seq
            started = threading.Event()
            streamed = pool.submit(_stream, base, key, started)
            assert started.wait(60), "the stream never received text"
            frozen.freeze()  # mid-generation: the stream stays in flight until the cut
            [request_id] = [e.request_id for e in audit_store.tail(20) if e.kind == "request" and e.seq > head]
            thawing = threading.Thread(target=frozen.thaw_once_stopped,
                                       args=(request_id, time.monotonic() + 60, thaw_after_s))
            thawing.start()
            base.process.send_signal(signal.SIGTERM)
            if forced:
                _until_stopping(base)
                base.process.send_signal(signal.SIGTERM)
            stream = streamed.result(timeout=60)
            assert base.process.wait(timeout=60) is not None
            thawing.join(60)
        yield request_id, stream, frozen
    finally:
        stop_process(worker, timeout_s=30)


def test_an_unchecked_stream_cut_by_the_stop_gets_what_its_client_received_recorded(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """Without output rules a cut stream's worker cannot be told what its client received (no verdict goes to
    it): it records ``cancelled`` with what it generated, a moment after the cut. The gateway's stop looks
    for that end once more before it closes, and appends the ``delivered`` entry that says what the client
    got. The worker is frozen mid-stream and let go when the cut sets its cancel flag."""
    own = own_redis.with_(drain_s=1.0, output_rules=False, request_timeout_s=120)
    with _stream_cut_by_a_stop(own, keyring["admin"], audit_store, tmp_path) as (request_id, stream, frozen):
        assert frozen.stop_seen and stream["text"] and not stream["done"]
        assert stream["last"]["error"]["code"] == "shutting_down", stream["last"]
        end = wait_terminal(audit_store, request_id)
        assert end.kind == "cancelled" and end.payload["output"].startswith(stream["text"])
        assert not any(key.startswith("client_output") for key in {**end.body, **end.payload})
        entries = audit_store.entries_for(request_id)
        assert [e.kind for e in entries] == ["request", "cancelled", "delivered"], (tmp_path / "serve.log").read_text()
        assert entries[-1].body["terminal_seq"] == end.seq and entries[-1].payload["client_output"] == stream["text"]


@pytest.mark.parametrize(("forced", "drain_s", "thaw_after_s"), [(False, 1.0, 3.0), (True, 30.0, 0.5)],
                         ids=["ordinary-stop", "forced-stop"])
def test_the_closing_checkpoint_signs_the_end_a_cut_streams_worker_records_after_the_cut(
        own_redis, keyring, audit_store, tmp_path, forced: bool, drain_s: float,
        thaw_after_s: float) -> None:  # noqa: F811
    """A stream cut by the stop has its answer (the error event) at once, but its end only when its worker
    next looks at the cancel key: seconds later with a slow model. The gateway signed its closing checkpoint
    and exited first, so that end was an unsigned tail after a closing checkpoint (`verify`: UNVERIFIED)
    after an ordinary stop (probe s54 A1). Now its stop waits (bounded) for the ends of the requests it cut.
    The worker is frozen mid-stream and let go 3 s after the cut set its cancel flag (the gateway had
    answered the cut, signed and exited by then). A forced stop (a second signal) signed at once, and the
    end the worker recorded milliseconds later came after it (probe s55 F2): it now waits up to 1.5 s of its
    3 s; the worker is let go 0.5 s after the cut."""
    from audit.checkpoints import CheckpointStore

    own = own_redis.with_(drain_s=drain_s, request_timeout_s=120)
    with _stream_cut_by_a_stop(own, keyring["admin"], audit_store, tmp_path, thaw_after_s=thaw_after_s,
                               forced=forced) as (request_id, stream, frozen):
        assert frozen.stop_seen and stream["last"]["error"]["code"] == "shutting_down", stream["last"]
        end = wait_terminal(audit_store, request_id)
        assert end.kind == "cancelled", end.body
        closing = CheckpointStore(audit_store.engine).latest()
        assert closing is not None and closing.closing and closing.seq >= end.seq, (closing, end.seq)
