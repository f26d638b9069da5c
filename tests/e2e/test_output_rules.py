"""Output rules on the request path, end to end: served gateways, real workers, the tiny model, regorus.

The test policy is the shipped folder with test data for its output rules
(policies/output.rego): a national id whose pattern is one phrase of three
words the tiny model really says (so of at least three pieces), redacted in
outputs, and a blocked pattern of one word it says, which stops them. The
module asks the model first (its greedy output is deterministic) through a
gateway whose patterns match nothing, then writes the data around what it said.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import struct
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

from govgate.processes import stop_process
from tests.conftest import (ORPHAN_MODEL, OUTPUT_MODEL, _roomy_limits, bearer, policy_copy, serving, spawn_cli,
                            wait_for_worker)
from tests.e2e.test_stream_faults import wait_terminal
from tests.gateway.test_fail_closed import queued
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.privacy import Digester
from workers.contract.sealing import load_or_create_key

#: Prompts whose outputs the tests judge: the first's gets a phrase redacted, the second's is stopped.
REDACT_PROMPT = "Once upon a time"
STOP_PROMPT = "The history of the printing press begins in"
MAX_TOKENS = 48
#: The served gateway's hold-back: a few words, so a stream is judged in several windows.
HOLDBACK = 16
NEVER = "QQ_no_such_output_QQ"


def write_rules(folder: Path, *, stop: str, phrase: str) -> None:
    """Give the folder's output rules a phrase to redact and a word to stop on (regular expressions of them)."""
    data_file = folder / "data.json"
    document = json.loads(data_file.read_text())
    content = document["govgate_config"]["content"]
    content["national_ids"] = [i for i in content["national_ids"] if i["id"] != "test_phrase"] + [
        {"id": "test_phrase", "pattern": re.escape(phrase)}]
    content["blocked_patterns"] = [p for p in content["blocked_patterns"] if p["id"] != "test_stop"] + [
        {"id": "test_stop", "pattern": re.escape(stop), "message": "the test's stop word"}]
    content["detectors"]["test_phrase"] = {"action": "redact"}
    content["output"]["detectors"].update(test_phrase={"action": "redact"}, test_stop={"action": "stop"})
    data_file.write_text(json.dumps(document, indent=2))


def body(prompt: str, **fields) -> dict:
    return {"model": OUTPUT_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}


@dataclass(frozen=True)
class Rules:
    """The served gateway and what its rules were written around."""

    base: str
    redact_text: str  # the model's output for REDACT_PROMPT, as generated
    stop_text: str  # … for STOP_PROMPT
    phrase: str
    stop: str


def pick_phrase(text: str) -> str:
    """Three words from the middle of ``text`` (three pieces or more), no longer than the hold-back."""
    words = text.split(" ")
    for start in range(3, len(words) - 6):
        phrase = " ".join(words[start:start + 3])
        if 8 <= len(phrase) <= HOLDBACK and text.count(phrase) == 1 and all(words[start:start + 3]):
            return phrase
    raise AssertionError(f"no phrase to redact in {len(text)} characters of output")


def pick_stop(text: str, avoid: str) -> str:
    """A word from the middle of ``text`` that ``avoid`` does not hold and that comes once."""
    words = [w for w in text.split(" ") if len(w) >= 4]
    for word in words[len(words) // 3:]:
        if word not in avoid and text.count(word) == 1 and word not in REDACT_PROMPT + STOP_PROMPT:
            return word
    raise AssertionError("no stop word")


@pytest.fixture(scope="module")
def output_worker(settings) -> Iterator:
    # Token by token (GOVGATE_STREAM_FLUSH_INTERVAL_MS=0): the hold-back's hardest case, a phrase split across
    # many pieces, and as many windows as the text allows; with the default interval this fast model's
    # stream arrives in a few pieces, as many as the machine's speed makes.
    process = spawn_cli(settings.with_(stream_flush_interval_ms=0), "worker", "--model", OUTPUT_MODEL,
                        log=settings.var_dir / "output-worker.log")
    wait_for_worker(settings.redis_url, OUTPUT_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


@pytest.fixture(scope="module")
def rules(settings, keyring, output_worker, tmp_path_factory) -> Iterator[Rules]:
    folder = policy_copy(tmp_path_factory.mktemp("output-rules"), _roomy_limits)
    write_rules(folder, stop=NEVER, phrase=NEVER)
    own = settings.with_(policy_dir=folder, output_holdback_chars=HOLDBACK)
    logs = tmp_path_factory.mktemp("output-logs")
    with serving(own, logs / "probe.log") as probe:
        texts = []
        for prompt in (REDACT_PROMPT, STOP_PROMPT):
            response = httpx.post(f"{probe}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                                  json=body(prompt))
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
    redact_text, stop_text = texts
    phrase, stop = pick_phrase(redact_text), pick_stop(stop_text, redact_text)
    write_rules(folder, stop=stop, phrase=phrase)
    with serving(own, logs / "serve.log") as base:
        yield Rules(base, redact_text, stop_text, phrase, stop)


def digester(settings) -> Digester:
    return Digester(load_or_create_key(settings.effective_digest_key_file))


def stream_events(base: str, key: str, body: dict) -> tuple[str, list[dict]]:
    """The request id and every SSE event of a streamed request, read raw."""
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    return request_id, events


def orphan_worker_ends(settings, audit_store, request_id: str, log: Path):
    """Start the orphaned model's worker (1 s verdict timeout); the request's terminal entry once written.

    A handed-over output's fallback is written by a retry once due: this worker's looks every 0.2 s
    (``GOVGATE_TERMINAL_RETRY_INTERVAL_S``) rather than the default's 5 s, which the test would wait out.
    """
    own = settings.with_(output_verdict_timeout_s=1.0, terminal_retry_interval_s=0.2)
    worker = spawn_cli(own, "worker", "--model", ORPHAN_MODEL, log=log)
    try:
        wait_for_worker(settings.redis_url, ORPHAN_MODEL, worker)
        deadline = time.monotonic() + 60
        while audit_store.terminal_for(request_id) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(worker, timeout_s=30)
    return audit_store.terminal_for(request_id)


def test_a_gateway_killed_before_the_verdict_leaves_the_output_recorded_unchecked(settings, keyring, audit_store,
                                                                                   tmp_path):
    """The job is queued, its gateway dies, then a worker runs it: nobody answers its report."""
    with serving(settings, tmp_path / "serve.log") as base:
        with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json={"model": ORPHAN_MODEL, "prompt": "Once upon a time", "max_tokens": 16,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            assert [e.kind for e in audit_store.entries_for(request_id)] == ["request"]  # recorded, then queued
            base.process.kill()  # the gateway dies with the job in the queue
            base.process.wait(timeout=30)
    terminal = orphan_worker_ends(settings, audit_store, request_id, tmp_path / "worker.log")
    assert terminal is not None and terminal.kind == "failed"
    assert terminal.body["error"]["code"] == "output_unchecked"
    assert terminal.body["usage"]["completion_tokens"] == 16  # it was generated, and kept as logging allows
    assert "output_decision" not in terminal.body and "client_output" not in (terminal.payload or {})


def test_a_gateway_killed_before_it_records_a_handed_over_output_leaves_it_recorded_unchecked(
        settings, keyring, audit_store, tmp_path):
    """A non-streamed job: its worker hands the output over and moves on; nobody records it but the fallback."""
    outcome: dict = {}
    with serving(settings, tmp_path / "serve.log") as base:
        def ask() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                    json={"model": ORPHAN_MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0})
            except httpx.HTTPError as exc:  # the gateway dies under the request
                outcome["error"] = exc

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 60
        while not (ids := [e.request_id for e in audit_store.iter_entries(audit_store.head().seq - 50)
                           if e.kind == "request" and e.model == ORPHAN_MODEL
                           and audit_store.terminal_for(e.request_id) is None]):
            assert time.monotonic() < deadline, "the request was never recorded"
            time.sleep(0.05)
        while not queued(settings, ORPHAN_MODEL):  # recorded comes before queued: killed between, the job
            assert time.monotonic() < deadline, "the job was never queued"  # would be the sweep's (gateway_lost)
            time.sleep(0.02)
        base.process.kill()  # the gateway dies with the job in the queue
        base.process.wait(timeout=30)
        asker.join(30)
    assert "response" not in outcome
    [request_id] = ids
    terminal = orphan_worker_ends(settings, audit_store, request_id, tmp_path / "worker.log")
    assert terminal is not None and terminal.kind == "failed", (tmp_path / "worker.log").read_text()[-3000:]
    assert terminal.body["error"]["code"] == "output_unchecked"
    assert terminal.body["usage"]["completion_tokens"] == 16 and "recorded_late" in terminal.body
    assert "output_decision" not in terminal.body and terminal.payload["output"]
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "failed"]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not client.hexists(PENDING_KEY, request_id)  # written once, then dropped
    finally:
        client.close()


def test_a_handed_over_completion_is_recorded_once_by_its_gateway(rules, settings, keyring, audit_store):
    response = httpx.post(f"{rules.base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json=body(STOP_PROMPT, max_tokens=4))
    assert response.status_code == 200, response.text
    request_id = response.headers["x-govgate-request-id"]
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "completion"]
    terminal = audit_store.terminal_for(request_id)
    assert terminal.body["timings"]["handed_over_ms"] >= 0 and terminal.body["timings"]["generate_ms"] > 0
    assert "verdict_ms" not in terminal.body["timings"]  # the worker did not wait for one
    assert terminal.body["worker"]["pid"] != rules.base.process.pid  # the worker's, as it generated it
    assert terminal.payload["client_output"] == terminal.payload["output"] == response.json()["choices"][0]["text"]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + 10  # dropped in a batch, off the request's path (within 50 ms)
        while client.hexists(PENDING_KEY, request_id):
            assert time.monotonic() < deadline, "the worker's fallback was not dropped"
            time.sleep(0.01)
    finally:
        client.close()


def content_chunks(events: list[dict]) -> list[str]:
    return [e["choices"][0]["text"] for e in events if e.get("choices") and e["choices"][0]["text"]]


def test_a_completion_gets_the_phrase_masked_and_the_log_keeps_both_texts(rules, settings, keyring, audit_store):
    response = httpx.post(f"{rules.base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json=body(REDACT_PROMPT))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    masked = rules.redact_text.replace(rules.phrase, "[REDACTED:test_phrase]")
    assert choice["text"] == masked != rules.redact_text
    terminal = audit_store.terminal_for(response.headers["x-govgate-request-id"])
    assert terminal.kind == "completion" and terminal.body["finish_reason"] == choice["finish_reason"]
    assert terminal.payload["output"] == rules.redact_text  # as generated (the admin's logging is full)
    assert terminal.payload["client_output"] == masked
    decision = terminal.body["output_decision"]
    assert decision["allow"] is True and decision["stopped"] is False
    assert decision["findings"] == [{"detector": "test_phrase",
                                     "hmac_sha256": digester(settings).hexdigest(rules.phrase)}]
    assert rules.phrase not in json.dumps(terminal.body)


def test_a_stopped_completion_is_a_content_filter_finish_with_no_text(rules, keyring, audit_store):
    response = httpx.post(f"{rules.base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json=body(STOP_PROMPT))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("", "content_filter")
    terminal = audit_store.terminal_for(response.headers["x-govgate-request-id"])
    assert terminal.kind == "completion" and terminal.body["finish_reason"] == "content_filter"
    assert terminal.body["output_decision"]["reasons"] == [{
        "code": "output_blocked_content", "message": "the output matches blocked content rule 'test_stop'"}]
    assert terminal.payload["output"] == rules.stop_text and terminal.payload["client_output"] == ""


def test_a_stream_never_delivers_the_split_phrase_and_holds_back_its_start(rules, keyring, audit_store):
    request_id, events = stream_events(rules.base, keyring["admin"], body(REDACT_PROMPT))
    assert events[-1] == {"done": True} and "error" not in json.dumps(events)
    chunks = content_chunks(events)
    masked = rules.redact_text.replace(rules.phrase, "[REDACTED:test_phrase]")
    assert "".join(chunks) == masked
    assert len(chunks) >= 3  # released window by window, not in one piece at the end
    delivered = ""
    for chunk in chunks:  # nothing released is ever taken back: each chunk continues the masked text
        delivered += chunk
        assert masked.startswith(delivered)
        assert not any(delivered.endswith(rules.phrase[:n]) for n in range(2, len(rules.phrase) + 1)), \
            "a released chunk ended with the start of the phrase that is redacted later"
    terminal = audit_store.terminal_for(request_id)
    assert terminal.payload["client_output"] == masked and terminal.payload["output"] == rules.redact_text


def test_a_stopped_stream_ends_with_a_content_filter_chunk_then_done(rules, keyring, audit_store):
    request_id, events = stream_events(rules.base, keyring["admin"], body(STOP_PROMPT))
    assert events[-1] == {"done": True}
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "content_filter" and not last["text"]
    delivered = "".join(content_chunks(events))
    assert rules.stop not in delivered and rules.stop_text.startswith(delivered)
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "completion" and terminal.body["finish_reason"] == "content_filter"
    assert terminal.payload["client_output"] == delivered
    assert rules.stop in terminal.payload["output"]  # the log keeps what the model said, up to the stop


def evaluator_pids(gateway_pid: int) -> list[int]:
    """The gateway's regorus evaluator processes (``python -c``)."""
    children = Path(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read_text().split()
    return [int(pid) for pid in children if b"\0-c\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def test_output_rules_that_cannot_be_evaluated_end_the_stream_with_an_error(rules, keyring, audit_store,
                                                                           output_worker):
    """The worker is held while the request is admitted; the evaluators are then frozen, the worker let go."""
    worker = [output_worker.pid, *map(int, Path(f"/proc/{output_worker.pid}/task/{output_worker.pid}/children")
                                      .read_text().split())]
    evaluators = evaluator_pids(rules.base.process.pid)
    assert evaluators
    signal_all(worker, signal.SIGSTOP)
    try:
        with httpx.stream("POST", f"{rules.base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json={**body(REDACT_PROMPT), "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            signal_all(evaluators, signal.SIGSTOP)  # admitted already: only the output is judged from here on
            signal_all(worker, signal.SIGCONT)
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        signal_all(worker, signal.SIGCONT)
        signal_all(evaluators, signal.SIGCONT)
    events = [json.loads(line[6:]) for line in lines]
    assert events[-1]["error"]["code"] == "policy_unavailable" and "withheld" in events[-1]["error"]["message"]
    assert content_chunks(events[:-1]) == []  # nothing was judged, so nothing was released
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "failed" and terminal.body["error"]["code"] == "output_policy_unavailable"
    # generated (all of it, or up to the stop the failed judgement caused), recorded, not served
    assert terminal.payload["output"] and rules.redact_text.startswith(terminal.payload["output"])
    assert terminal.body["output_decision"]["allow"] is False


def all_evaluator_pids(gateway_pid: int) -> list[int]:
    """The gateway's evaluator processes, whichever of its threads started them (a pool's starter thread's
    children are not its main thread's)."""
    pids = []
    for children in Path(f"/proc/{gateway_pid}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()
                 if b"\0-c\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return pids


def unread_request_bytes(pid: int) -> int:
    """Bytes waiting in an evaluator's request pipe (its stdin): a decision it was asked for and has not read."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    finally:
        os.close(fd)


def test_a_client_that_leaves_while_the_last_window_is_judged_ends_the_stream_cancelled_at_once(
        settings, keyring, audit_store, output_worker, tmp_path):
    """The worker has reported and waits for its verdict; the gateway is judging; the client hangs up.

    The judgement is abandoned with the client's connection. Its worker, waiting for the verdict, used
    to wait out its whole verdict timeout (10 s, holding its model) and record ``failed``/``output_unchecked``
    ("neither checked nor served") though its client had been streamed text. The hold-back is longer
    than the output, so the report's is the stream's only judgement, and the evaluators are frozen
    once the request is admitted, so that judgement is in progress until the client leaves: the
    decision it asked for is seen waiting in an evaluator's pipe.
    """
    own = settings.with_(output_holdback_chars=4096, policy_timeout_s=120.0)
    log = tmp_path / "serve.log"
    worker = [output_worker.pid, *map(int, Path(f"/proc/{output_worker.pid}/task/{output_worker.pid}/children")
                                      .read_text().split())]
    evaluators: list[int] = []
    with serving(own, log) as base:
        evaluators = all_evaluator_pids(base.process.pid)
        assert evaluators
        signal_all(worker, signal.SIGSTOP)  # it must not report before the evaluators are frozen
        try:
            with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                              json={**body(REDACT_PROMPT), "stream": True}) as response:
                assert response.status_code == 200
                request_id = response.headers["x-govgate-request-id"]
                signal_all(evaluators, signal.SIGSTOP)  # admitted already: only the output is judged from here on
                signal_all(worker, signal.SIGCONT)
                deadline = time.monotonic() + 60
                while not any(unread_request_bytes(pid) for pid in evaluators):
                    assert time.monotonic() < deadline, "the output was never sent to be judged"
                    time.sleep(0.01)
            # the client has hung up mid-judgement
            terminal = wait_terminal(audit_store, request_id)
        finally:
            signal_all(worker, signal.SIGCONT)
            signal_all(evaluators, signal.SIGCONT)
        # The abandoned judgement's late reply is read and dropped: the same evaluators judge the next output.
        after = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                           json=body(REDACT_PROMPT))
        assert after.status_code == 200, after.text
        assert sorted(all_evaluator_pids(base.process.pid)) == sorted(evaluators)
    assert "starting a new one" not in log.read_text()  # none was killed and restarted
    assert terminal.kind == "cancelled", terminal.body.get("error")
    assert terminal.body["error"]["code"] == "cancelled"
    # what the worker generated is kept and charged; the client received nothing (nothing was judged)
    assert terminal.payload["output"]
    assert terminal.body["usage"]["completion_tokens"] > 0
    assert terminal.payload["client_output"] == ""
    assert terminal.body["output_decision"]["stopped"] is False
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "cancelled"]
