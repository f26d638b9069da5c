"""A request the gateway's request timeout ends while its model generates is charged what the model generated.

h8 finding 1: the gateway wrote its own ``timed_out`` entry with no usage,
won the one terminal slot and released the reservation; the worker's entry
with the real counts was refused as a second terminal. Here a served gateway
with a short request timeout and a worker of its own (a model nobody else
serves): the test freezes the worker once its generation has begun, waits
until the gateway has timed the request out and told the worker to stop,
then lets it go on. The worker sees the stop, ends the generation and
records it; the request must be charged (limits counters), audited (the
terminal entry's ``usage``) and counted (``govgate_tokens_total``) at what
the worker generated. A request that timed out while still queued (a model
no worker serves) is still charged nothing. Each test has a principal of its
own, so its counters show what was charged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from typing import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from gateway.limits import UsageCounters
from gateway.limits.charge import used_tokens
from govgate.processes import stop_process
from tests.conftest import (IDLE_MODEL, TIMEOUT_MODEL, _roomy_limits, bearer, policy_copy, serving, spawn_cli,
                            wait_for_worker)
from tests.e2e.test_crash_safety import pool_children
from tests.e2e.test_output_rules import HOLDBACK, pick_phrase
from tests.e2e.test_stream_faults import wait_terminal
from tests.keys_and_limits import new_key
from workers.contract.jobs import JOB_STARTED, cancel_key
from workers.contract.output_check import verdict_key
from workers.generation import GATEWAY_TIMEOUT_MESSAGE

pytestmark = pytest.mark.anyio

#: The gateway's request timeout: long enough for the job to be taken and begun on a busy machine, short
#: because every test but the queued one waits it out with its worker frozen. (Its failures under load,
#: the job recorded ``expired``, were the worker's: frozen between its claim and its clock read, it judged
#: the deadline at the thaw. The deadline is now judged at the take: test_worker_jobs.)
TIMEOUT_S = 8.0
TEAM = "tc-team"
#: Tokens asked for: the tiny model takes over a second for them, the freeze lands well inside that.
MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def timeout_worker(settings) -> Iterator:
    process = spawn_cli(settings, "worker", "--model", TIMEOUT_MODEL, log=settings.var_dir / "timeout-worker.log")
    wait_for_worker(settings.redis_url, TIMEOUT_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


@pytest.fixture(scope="module")
def gateway(settings, timeout_worker, tmp_path_factory) -> Iterator[str]:
    with serving(settings.with_(request_timeout_s=TIMEOUT_S), tmp_path_factory.mktemp("tc") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def unchecked_gateway(settings, timeout_worker, tmp_path_factory) -> Iterator[str]:
    """The same gateway with no output rules (``GOVGATE_OUTPUT_RULES=0``): its streams are relayed as they come."""
    own = settings.with_(request_timeout_s=TIMEOUT_S, output_rules=False)
    with serving(own, tmp_path_factory.mktemp("tc-unchecked") / "serve.log") as base:
        yield base


@pytest.fixture(params=["checked", "unchecked"])
def stream_gateway(request) -> tuple[str, bool]:
    """A gateway's URL, and whether its streams are under output rules."""
    checked = request.param == "checked"
    return request.getfixturevalue("gateway" if checked else "unchecked_gateway"), checked


def fresh_key(settings) -> tuple[str, str]:
    principal = f"tc-{uuid.uuid4().hex[:10]}"
    return principal, new_key(settings, principal, TEAM, roles=("admin",))


async def charged(settings, principal: str) -> dict[str, int]:
    """What the principal's counters hold: tokens charged today, requests in flight."""
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        document = await UsageCounters(client).snapshot(principal, TEAM)
    finally:
        await client.aclose()
    return {"tokens_today": document["principal"]["tokens_today"], "in_flight": document["principal"]["in_flight"]}


def tokens_counted(base: str) -> float:
    """``govgate_tokens_total`` of the served gateway, all models and kinds."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "govgate_tokens_total":
                total += sample.value
    return total


def request_id_of(audit_store, principal: str, start: int, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = next((e.request_id for e in audit_store.iter_entries(start)
                      if e.kind == "request" and e.principal == principal), "")
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError("the request was never recorded")


class Freezer:
    """Freezes the worker's generating process once ``request_id``'s generation began (or when told), and
    lets it go on once the gateway asked the job to stop (its state key is no longer ``started``)."""

    def __init__(self, settings, worker) -> None:
        self.client = redis.Redis.from_url(settings.redis_url)
        self.worker = worker
        self.frozen: list[int] = []
        self.stop_seen = False

    def freeze(self) -> None:
        if not self.frozen:
            self.frozen = pool_children(self.worker.pid) or [self.worker.pid]
            for pid in self.frozen:
                os.kill(pid, signal.SIGSTOP)

    def freeze_once_started(self, request_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.client.get(cancel_key(request_id)) == JOB_STARTED:
                self.freeze()
                return
            time.sleep(0.002)
        raise AssertionError("the generation never began")

    def thaw_once_stopped(self, request_id: str, deadline: float, delay_s: float = 0.0) -> None:
        """Let the worker go on once the gateway has asked the job to stop (its timeout, a drain's cut),
        ``delay_s`` after it did."""
        while time.monotonic() < deadline:
            if self.client.get(cancel_key(request_id)) not in (None, JOB_STARTED):
                self.stop_seen = True
                time.sleep(delay_s)
                break
            time.sleep(0.02)
        self.thaw()

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        self.thaw()
        self.client.close()


@contextlib.contextmanager
def freezer(settings, worker) -> Iterator[Freezer]:
    found = Freezer(settings, worker)
    try:
        yield found
    finally:
        found.close()


def assert_charged_what_it_generated(settings, audit_store, principal: str, request_id: str) -> dict:
    """The terminal entry is ``timed_out`` with the worker's counts, and the counters were charged them."""
    terminal = wait_terminal(audit_store, request_id)
    assert terminal.kind == "timed_out", terminal.body
    # recorded by the worker the timeout stopped (not its own time limit's message)
    assert terminal.body["error"] == {"code": "timed_out", "message": GATEWAY_TIMEOUT_MESSAGE}
    usage = terminal.body.get("usage")
    assert usage and usage["completion_tokens"] > 0 and "basis" not in usage, terminal.body
    kinds = [e.kind for e in audit_store.entries_for(request_id)]
    assert kinds[:2] == ["request", "timed_out"] and kinds[2:] in ([], ["delivered"]), kinds  # a stream's, unchecked
    return usage


async def test_a_completion_the_timeout_ends_while_generating_is_charged(gateway, settings, timeout_worker,
                                                                        audit_store):
    principal, key = fresh_key(settings)
    counted_before = tokens_counted(gateway)
    start = audit_store.head().seq
    answer: dict = {}

    def ask() -> None:
        answer["response"] = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                                        json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                              "temperature": 0})

    with freezer(settings, timeout_worker) as frozen:
        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 60
        request_id = request_id_of(audit_store, principal, start, deadline)
        frozen.freeze_once_started(request_id, deadline)
        frozen.thaw_once_stopped(request_id, deadline)
        asking.join(120)
    response = answer["response"]
    assert frozen.stop_seen
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    usage = assert_charged_what_it_generated(settings, audit_store, principal, request_id)
    assert await charged(settings, principal) == {"tokens_today": used_tokens(usage), "in_flight": 0}
    assert tokens_counted(gateway) - counted_before == used_tokens(usage)


async def test_a_stream_the_timeout_ends_while_generating_is_charged_and_gets_what_was_generated(
        stream_gateway, settings, timeout_worker, audit_store):
    gateway, checked = stream_gateway
    principal, key = fresh_key(settings)
    counted_before = tokens_counted(gateway)
    text, last = "", None
    with freezer(settings, timeout_worker) as frozen:
        with httpx.stream("POST", f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            thawing = None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                last = json.loads(line[6:])
                if last.get("choices"):
                    text += last["choices"][0].get("text") or ""
                    if text and thawing is None:  # the generation is under way: freeze it until the stop
                        frozen.freeze()
                        thawing = threading.Thread(target=frozen.thaw_once_stopped,
                                                   args=(request_id, time.monotonic() + 60))
                        thawing.start()
            assert thawing is not None
            thawing.join(120)
    assert frozen.stop_seen
    assert last is not None and last["error"]["code"] == "timed_out"
    usage = assert_charged_what_it_generated(settings, audit_store, principal, request_id)
    terminal = audit_store.terminal_for(request_id)
    # the worker's entry holds all it generated: what the client received, and under the output rules
    # perhaps a held-back tail it never got
    assert text and terminal.payload["output"].startswith(text)
    if checked:  # and what the client received and the decision on what was judged, as a cancelled
        # stream's entry does (probe p2 #3: the timeout's had neither)
        assert terminal.payload["client_output"] == text
        assert terminal.body["output_decision"]["stopped"] is False
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "timed_out"]
    else:  # the worker's entry cannot say what reached the client: its gateway's delivered entry does
        assert "client_output" not in {**terminal.body, **terminal.payload}
        entries = audit_store.entries_for(request_id)
        assert [e.kind for e in entries] == ["request", "timed_out", "delivered"]
        assert entries[-1].body["terminal_seq"] == terminal.seq and entries[-1].payload["client_output"] == text
        assert "output_decision" not in entries[-1].body
    assert await charged(settings, principal) == {"tokens_today": used_tokens(usage), "in_flight": 0}
    assert tokens_counted(gateway) - counted_before == used_tokens(usage)


async def test_a_stream_whose_client_leaves_during_the_timeout_s_grace_still_ends_timed_out(
        gateway, settings, timeout_worker, audit_store):
    """The client of a timed-out stream leaves while the worker has its grace to report: the request still ends
    ``timed_out``, charged what the worker generated, keeping what the client received (under the output
    rules, on here). Before, the leaving cancelled the job over the timeout's stop: the worker recorded
    ``cancelled`` (probe q1's leftover)."""
    principal, key = fresh_key(settings)
    text = ""
    with freezer(settings, timeout_worker) as frozen:
        with httpx.stream("POST", f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            lines = response.iter_lines()  # held: a line iterator let go closes the connection
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    text += (event.get("choices") or [{}])[0].get("text") or ""
                    if text:  # the generation is under way: frozen until the client has left
                        frozen.freeze()
                        break
            deadline = time.monotonic() + 60
            while frozen.client.get(cancel_key(request_id)) in (None, JOB_STARTED):  # the timeout's stop
                assert time.monotonic() < deadline, "the request never timed out"
                time.sleep(0.02)
        time.sleep(2)  # the connection closed inside the grace: the gateway sees its client gone
        frozen.thaw()
    usage = assert_charged_what_it_generated(settings, audit_store, principal, request_id)
    terminal = audit_store.terminal_for(request_id)
    assert terminal.payload["client_output"].startswith(text), terminal.payload  # sent before it left
    assert terminal.body["output_decision"]["stopped"] is False
    assert await charged(settings, principal) == {"tokens_today": used_tokens(usage), "in_flight": 0}


async def test_a_request_the_timeout_ends_while_queued_is_charged_nothing(gateway, settings, audit_store):
    """Nothing generated, nothing charged; and the dead job is taken back from its queue at once: it held its
    place (and its team's waiting count) until a worker reached it, a frozen worker's never (probe p2)."""
    from tests.gateway.test_fail_closed import queued

    principal, key = fresh_key(settings)
    before = queued(settings, IDLE_MODEL)
    response = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": IDLE_MODEL, "prompt": "Tell", "max_tokens": 8})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    terminal = wait_terminal(audit_store, response.headers["x-govgate-request-id"])
    assert terminal.kind == "timed_out" and "usage" not in terminal.body
    assert await charged(settings, principal) == {"tokens_today": 0, "in_flight": 0}
    assert queued(settings, IDLE_MODEL) == before
    with httpx.stream("POST", f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                      json={"model": IDLE_MODEL, "prompt": "Tell", "max_tokens": 8, "stream": True}) as streamed:
        assert streamed.status_code == 200
        assert any('"timed_out"' in line for line in streamed.iter_lines())
        streamed_id = streamed.headers["x-govgate-request-id"]
    assert queued(settings, IDLE_MODEL) == before
    # the timed_out verdict sent for its (checked) stream is taken back: no worker will ever read it, and it
    # sat sealed in Redis for its 300 s otherwise
    assert wait_terminal(audit_store, streamed_id).kind == "timed_out"
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not client.exists(verdict_key(streamed_id))
    finally:
        client.close()


async def test_a_begun_request_whose_worker_does_not_report_in_the_grace_is_charged_its_reservation(
        gateway, settings, timeout_worker, audit_store):
    """The worker stays frozen past the grace: what it generated is not known, so the whole reservation is
    charged (fail closed), and the gateway's entry says so; the worker's later end is refused."""
    principal, key = fresh_key(settings)
    start = audit_store.head().seq
    answer: dict = {}

    def ask() -> None:
        answer["response"] = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                                        json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                              "temperature": 0})

    with freezer(settings, timeout_worker) as frozen:
        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 60
        request_id = request_id_of(audit_store, principal, start, deadline)
        frozen.freeze_once_started(request_id, deadline)
        asking.join(120)  # frozen all along: the timeout, then the grace, run out
    response = answer["response"]
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    terminal = wait_terminal(audit_store, request_id)
    assert terminal.kind == "timed_out"
    usage = terminal.body["usage"]
    assert usage["basis"] == "reservation" and usage["completion_tokens"] == MAX_TOKENS, terminal.body
    assert "charged what it reserved" in terminal.body["error"]["message"]
    assert await charged(settings, principal) == {"tokens_today": usage["total_tokens"], "in_flight": 0}


#: What the client receives in place of the phrase the redacting gateway's output rules find.
MASKED = "[REDACTED:test_phrase]"


@pytest.fixture(scope="module")
def redacting_gateway(settings, gateway, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A gateway whose admin role keeps conversations ``redacted`` and whose output rules redact a phrase
    the model says early in its answer; its URL and the phrase."""
    _, key = fresh_key(settings)
    probe = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                       json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": 40, "temperature": 0})
    assert probe.status_code == 200, probe.text
    phrase = pick_phrase(probe.json()["choices"][0]["text"])

    def change(config: dict) -> None:
        _roomy_limits(config)
        config["roles"]["admin"]["prompt_logging"] = "redacted"
        content = config["content"]
        content["national_ids"].append({"id": "test_phrase", "pattern": re.escape(phrase)})
        content["detectors"]["test_phrase"] = {"action": "redact"}
        content["output"]["detectors"]["test_phrase"] = {"action": "redact"}

    folder = tmp_path_factory.mktemp("tc-redacted")
    own = settings.with_(request_timeout_s=TIMEOUT_S, policy_dir=policy_copy(folder, change),
                         output_holdback_chars=HOLDBACK)
    with serving(own, folder / "serve.log") as base:
        yield base, phrase


async def test_a_redacted_stream_the_timeout_ends_keeps_what_its_client_received_and_no_finding_in_clear(
        redacting_gateway, settings, timeout_worker, audit_store):
    """Under the output rules the entry says what the client received (the masked text) and the decision,
    as a cancelled stream's does; under ``redacted`` no finding the rules masked for the client is kept
    in clear (h12 F1's worry for this end), and the output, not judged whole, is withheld."""
    base, phrase = redacting_gateway
    principal, key = fresh_key(settings)
    text, last = "", None
    with freezer(settings, timeout_worker) as frozen:
        with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            thawing = None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                last = json.loads(line[6:])
                if last.get("choices"):
                    text += last["choices"][0].get("text") or ""
                    if MASKED in text and thawing is None:  # the client has the masked phrase: freeze
                        frozen.freeze()
                        thawing = threading.Thread(target=frozen.thaw_once_stopped,
                                                   args=(request_id, time.monotonic() + 60))
                        thawing.start()
            assert thawing is not None, text
            thawing.join(120)
    assert frozen.stop_seen
    assert last is not None and last["error"]["code"] == "timed_out"
    assert phrase not in text
    usage = assert_charged_what_it_generated(settings, audit_store, principal, request_id)
    terminal = audit_store.terminal_for(request_id)
    assert terminal.payload["client_output"] == text
    assert terminal.body["output_decision"]["findings"], terminal.body["output_decision"]
    assert terminal.body.get("output_withheld") is True and "output" not in terminal.payload
    assert phrase not in json.dumps(terminal.body) + json.dumps(terminal.payload)
    assert await charged(settings, principal) == {"tokens_today": used_tokens(usage), "in_flight": 0}


async def test_a_stream_whose_worker_does_not_report_in_the_grace_keeps_what_its_client_received(
        stream_gateway, settings, timeout_worker, audit_store):
    """The worker stays frozen past the grace: the gateway records the end, charged the reservation, with
    the ``client_output`` (the text it delivered) and, checked, the decision it told the worker, as the
    worker's has them; that end says what the client received, so no ``delivered`` entry follows."""
    gateway, checked = stream_gateway
    principal, key = fresh_key(settings)
    text, last = "", None
    with freezer(settings, timeout_worker) as frozen:
        with httpx.stream("POST", f"{gateway}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": TIMEOUT_MODEL, "prompt": "Tell", "max_tokens": MAX_TOKENS,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                last = json.loads(line[6:])
                if last.get("choices"):
                    text += last["choices"][0].get("text") or ""
                    if text:
                        frozen.freeze()  # frozen all along: the timeout, then the grace, run out
    assert text and last is not None and last["error"]["code"] == "timed_out"
    terminal = wait_terminal(audit_store, request_id)
    assert terminal.kind == "timed_out" and terminal.body["usage"]["basis"] == "reservation", terminal.body
    assert terminal.payload["client_output"] == text == terminal.payload["output"]
    if checked:
        assert terminal.body["output_decision"]["stopped"] is False
    else:
        assert "output_decision" not in terminal.body
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "timed_out"]
    assert await charged(settings, principal) == {"tokens_today": terminal.body["usage"]["total_tokens"],
                                                  "in_flight": 0}
