"""Streams under faults: what the client saw is what the audit holds, and nothing is left behind.

Each test runs a served gateway (real uvicorn, real worker, real Redis) and
breaks something a stream depends on: the client leaves, Redis restarts, the
pool process generating the stream dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import pool_children
from workers.contract.registry import TINY_MODEL_NAME


def stream_once(base: str, key: str, body: dict, *, stop_after: int | None = None) -> dict:
    """Send one streaming request; return its id, the text received, the last event and whether it saw [DONE].

    ``stop_after`` abandons the stream (closes the connection) after that many text chunks.
    """
    text, last, done, chunks = "", None, False, 0
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            last = json.loads(line[6:])
            if "choices" in last and last["choices"]:
                piece = last["choices"][0].get("text") or ""
                text += piece
                chunks += bool(piece)
                if stop_after is not None and chunks >= stop_after:
                    break
    return {"request_id": request_id, "text": text, "last": last, "done": done}


def wait_terminal(audit_store, request_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = audit_store.terminal_for(request_id)
        if entry is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} never got its terminal entry")


def test_abandoned_streams_leave_no_pending_task_behind(settings, worker, keyring, audit_store, tmp_path):
    log = tmp_path / "serve.log"
    with serving(settings, log) as base:
        ids = []
        for _ in range(12):
            ids.append(stream_once(base, keyring["admin"], {"model": TINY_MODEL_NAME, "prompt": "Tell",
                                                            "max_tokens": 2000, "temperature": 0},
                                   stop_after=2)["request_id"])
        for request_id in ids:
            wait_terminal(audit_store, request_id)
        for _ in range(20):  # ordinary traffic afterwards: garbage gets collected meanwhile
            response = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                                  json={"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 2})
            assert response.status_code == 200, response.text
    assert [audit_store.terminal_for(i).kind for i in ids] == ["cancelled"] * len(ids)
    text = Path(log).read_text()
    assert "Task was destroyed but it is pending" not in text


@pytest.fixture
def own_redis_gateway(settings, tmp_path, request):
    """A Redis, a tiny-model worker and a served gateway of their own (the test restarts that Redis); settings
    a test gives by indirect parametrization replace the suite's."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-sf-"))
    state = {"redis": RedisProcess.start(redis_dir, persist=False), "dir": redis_dir}
    own = settings.with_(redis_url=state["redis"].url, **getattr(request, "param", {}))
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            state.update(base=base, settings=own, worker=worker, log=tmp_path / "serve.log")
            yield state
    finally:
        stop_process(worker, timeout_s=30)
        state["redis"].stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


def test_streams_after_a_redis_restart_deliver_exactly_the_audited_output(own_redis_gateway, keyring,
                                                                         audit_store):
    """The waiter's reconnect may find results stored before their pieces were read: nothing may go missing."""
    state = own_redis_gateway
    outcomes: list[dict] = []
    state["redis"].stop()
    # Down until the gateway's result listener has begun its second 5 s back-off sleep (0.1 s doubling to 5 s:
    # ~11 s after the loss), so the worker, whose broker retries come 2, 4 and 6 s apart, is back (~12 s) while
    # the listener still sleeps: results are then stored before their pieces are read. Its own log line says
    # when that sleep began (a fixed 11.5 s could fall before it on a slow machine, and the race was missed).
    asleep_at = _second_long_back_off(state["log"])
    state["redis"] = RedisProcess.start(state["dir"], persist=False)
    until = asleep_at + LISTENER_BACK_OFF_S + 1.5  # streams until the listener is back, and a few after

    def streams(n: int) -> list[dict]:
        done = []
        while time.monotonic() < until:
            try:
                done.append(stream_once(state["base"], keyring["admin"], {
                    "model": TINY_MODEL_NAME, "prompt": f"Story {n}", "max_tokens": 8, "temperature": 0}))
            except AssertionError:  # refused (503) while the gateway finds Redis again
                time.sleep(0.05)
        return done

    with ThreadPoolExecutor(6) as pool:
        for done in pool.map(streams, range(6)):
            outcomes += done
    assert len(outcomes) >= 6
    for outcome in outcomes:
        terminal = wait_terminal(audit_store, outcome["request_id"])
        if outcome["done"]:  # a success delivers exactly the audited output
            assert terminal.kind == "completion"
            assert outcome["text"] == terminal.payload["output"], outcome
        else:  # or the stream ends with an error event
            assert "error" in outcome["last"], outcome


#: The result listener's longest back-off between two reconnects (gateway/dispatch/results.py).
LISTENER_BACK_OFF_S = 5.0


def _second_long_back_off(log: Path, timeout_s: float = 60) -> float:
    """When (``time.monotonic()``) the result listener logged its second back-off of ``LISTENER_BACK_OFF_S``."""
    marker = "result listener lost Redis"
    sleeping = f"retrying in {LISTENER_BACK_OFF_S:.1f}s"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if marker in line and line.endswith(sleeping)]
        if len(lines) >= 2:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"the result listener never backed off {LISTENER_BACK_OFF_S}s twice: see {log}")


def test_a_stream_whose_worker_stalls_records_what_the_client_received(settings, keyring, audit_store, tmp_path):
    """The gateway gives up on a frozen worker (as on a dead one): its timed_out entry holds the text it sent."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-st-"))
    server = RedisProcess.start(redis_dir, persist=False)
    # The test waits this out once the worker is frozen, which is right after its first piece arrives.
    own = settings.with_(redis_url=server.url, request_timeout_s=3.0)
    worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    frozen: list[int] = []
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            text, last = "", None
            with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                              json={"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": 4000,
                                    "temperature": 0, "stream": True}) as response:
                request_id = response.headers["x-govgate-request-id"]
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    last = json.loads(line[6:])
                    if last.get("choices"):
                        text += last["choices"][0].get("text") or ""
                        if text and not frozen:  # the generation is under way: freeze it
                            # the process generating: the pool process under prefork, the worker under solo
                            frozen += pool_children(worker.pid) or [worker.pid]
                            for pid in frozen:
                                os.kill(pid, signal.SIGSTOP)
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            terminal = wait_terminal(audit_store, request_id)
            counted = streamed_errors(httpx.get(f"{base}/metrics", timeout=30).text)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop_process(worker, timeout_s=30)
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    assert frozen and text
    assert last["error"]["code"] == "timed_out"
    assert terminal.kind == "timed_out"
    assert terminal.payload["output"] == text
    # its worker could not report what it generated (frozen past the grace): charged what it reserved
    assert terminal.body["usage"]["basis"] == "reservation"
    assert counted == {"timed_out": 1.0}  # sent with a 200, counted under the error it ended with


def streamed_errors(exposition: str) -> dict[str, float]:
    """``govgate_requests_total`` of completions answered 2xx with an error code, by code."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "govgate_requests_total" and labels.get("status") == "2xx" and labels.get("code"):
                found[labels["code"]] = found.get(labels["code"], 0.0) + sample.value
    return found


def _began(audit_store, redis_url: str, timeout_s: float = 60) -> str:
    """The id of the newest request once its worker has begun it (its start claim is in Redis)."""
    import redis as redis_py

    from workers.contract.jobs import JOB_STARTED, cancel_key

    client = redis_py.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            requests = [e for e in audit_store.tail(5) if e.kind == "request"]
            if requests and client.get(cancel_key(requests[-1].request_id)) == JOB_STARTED:
                return requests[-1].request_id
            time.sleep(0.02)
    finally:
        client.close()
    raise AssertionError("no worker began the request")


_LONG_WAIT = {"request_timeout_s": 600.0}


@pytest.mark.parametrize("own_redis_gateway, stream", [
    (_LONG_WAIT, True), (_LONG_WAIT, False), ({**_LONG_WAIT, "output_rules": False}, True),
], ids=["stream", "whole", "unchecked-stream"], indirect=["own_redis_gateway"])
def test_a_request_whose_outcome_redis_lost_is_answered_from_its_audit_entry_once_redis_is_back(
        own_redis_gateway, keyring, audit_store, stream):
    """Redis dies mid-generation: the worker records the request ``failed`` (a stream's next piece meets no
    Redis; a whole answer, checked, has no gateway to judge it) but can neither publish nor store its outcome.
    The gateway, back on a new Redis, used to hear nothing until its request timeout (120 s by default)
    found that end; now it asks the audit log after the reconnect and answers from the entry. The request
    timeout here is far longer than the client waits: only that answer ends it. A stream, with output rules
    or without, gets its gateway's ``delivered`` entry: what its client received."""
    state = own_redis_gateway
    worker = state["worker"]
    outcome: dict = {}
    released = threading.Event()  # a stream's client has text: the gateway judged and released some

    def send() -> None:
        body = {"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": 3000, "temperature": 0, "stream": stream}
        if not stream:
            response = httpx.post(f"{state['base']}/v1/completions", headers=bearer(keyring["admin"]), timeout=90,
                                  json=body)
            outcome.update(status=response.status_code, last=response.json(), text="")
            return
        text, last = "", None
        with httpx.stream("POST", f"{state['base']}/v1/completions", headers=bearer(keyring["admin"]),
                          timeout=90, json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = json.loads(line[6:])
                    text += (last.get("choices") or [{}])[0].get("text") or ""
                    if text:
                        released.set()
        outcome.update(status=200, text=text, last=last)

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send)
        request_id = _began(audit_store, state["settings"].redis_url)
        assert not stream or released.wait(60), "the stream's client got no text"
        os.kill(worker.pid, signal.SIGSTOP)  # mid-generation (the solo pool generates in the worker itself)
        try:
            state["redis"].stop()
        finally:
            os.kill(worker.pid, signal.SIGCONT)  # its next look at Redis finds none: it records the request failed
        terminal = wait_terminal(audit_store, request_id)
        state["redis"] = RedisProcess.start(state["dir"], persist=False)  # empty: the outcome is nowhere
        sending.result(timeout=120)
    # a stream's worker fails at its next piece; a whole answer's, checked, at its hand-over (no gateway to judge)
    code = terminal.body["error"]["code"]
    assert terminal.kind == "failed" and code == ("worker_error" if stream else "output_unchecked"), terminal.body
    assert outcome["status"] == (200 if stream else 503), outcome
    assert outcome["last"]["error"]["code"] == code, outcome
    assert terminal.payload["output"].startswith(outcome["text"])
    assert "ended while Redis lost its worker's outcome" in Path(state["log"]).read_text()
    # the worker's entry cannot say what the client received; a stream's gateway appends what it released
    assert not any(key.startswith("client_output") for key in {**terminal.body, **(terminal.payload or {})})
    delivered = [entry for entry in audit_store.entries_for(request_id) if entry.kind == "delivered"]
    if not stream:  # a whole answer's client got none of it: its entry says "neither checked nor served"
        assert delivered == []
        return
    assert len(delivered) == 1 and delivered[0].seq > terminal.seq
    assert delivered[0].body["terminal_seq"] == terminal.seq and delivered[0].body["ended_as"] == "failed"
    assert outcome["text"] and delivered[0].payload["client_output"] == outcome["text"]
    if not state["settings"].output_rules:  # nothing was judged, nothing held back
        assert "output_decision" not in delivered[0].body
        return
    assert len(terminal.payload["output"]) > len(outcome["text"])  # the hold-back's part never reached it
    assert set(delivered[0].body["output_decision"]) == {"allow", "reasons", "findings", "stopped", "policy_revision"}
