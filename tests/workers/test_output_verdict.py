"""A checked job is recorded per its gateway's verdict (real model, real store, real Redis).

The test plays the gateway's part of the protocol (``workers/contract/output_check.py``):
it hears the worker's sealed report on the reply channel and LPUSHes a sealed verdict.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import replace
from typing import Callable, Iterator

import pytest
import redis

from bench._commandstats import CommandProbe
from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from tests.own_redis import module_redis_server  # noqa: F401  (fixture: commands are counted server-wide)
from tests.reply_listener import Listener
from workers.contract.jobs import (KEY_REVOKED_MESSAGE, REPLY_PIECE, STATUS_COMPLETED, STATUS_FAILED, STOP_KEY_REVOKED,
                                   GenerateJob, cancel_key, parse_reply)
from workers.contract.output_check import (REPLY_OUTPUT, OutputReport, OutputVerdict, verdict_key)
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminals
from workers.contract.privacy import Digester, mask
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.contract.terminal_body import Generated
from workers.generation import HANDED_OVER, run_job
from workers import streams
from workers.streams import RedisJobChannel

SEALER = Sealer(os.urandom(32))
DIGESTER = Digester(os.urandom(32))


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    redis_client = redis.Redis.from_url(redis_server.url)
    try:
        yield redis_client
    finally:
        redis_client.close()


def checked_job(reply_to: str, **fields) -> GenerateJob:
    return GenerateJob(request_id=uuid.uuid4().hex, model="tiny-test", endpoint="completions",
                       params=SamplingParams(max_tokens=12, temperature=0), principal="alice", team="research",
                       policy_revision="rev", prompt="Once upon a time", reply_to=reply_to, check_output=True,
                       **fields)


class Gateway:
    """Answers the first output report on ``channel`` with ``decide(report)`` (None: never answers)."""

    def __init__(self, client: redis.Redis, decide: Callable[[OutputReport], OutputVerdict | None]) -> None:
        self.channel = f"govgate:gateway:{uuid.uuid4().hex}"
        self.reports: list[OutputReport] = []
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(self.channel)
        self._pubsub.get_message(timeout=5)  # the subscribe confirmation
        self._client = client
        self._decide = decide
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        kind = REPLY_PIECE
        while kind == REPLY_PIECE:  # a stream's pieces come first
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=30)
            if message is None:
                return
            kind, request_id, data = parse_reply(message["data"])
        assert kind == REPLY_OUTPUT
        report = OutputReport.opened(data, SEALER)
        self.reports.append(report)
        verdict = self._decide(report)
        if verdict is not None:
            self._client.lpush(verdict_key(request_id), verdict.sealed(SEALER))

    def close(self) -> None:
        self._thread.join(timeout=30)
        self._pubsub.close()


def run(client: redis.Redis, job: GenerateJob, store, model, timeout_s: float = 10.0):
    channel = RedisJobChannel(client, job.request_id, streaming=job.stream, sealer=SEALER, reply_to=job.reply_to)
    return run_job(job, model, store, channel, digester=DIGESTER, verdict_timeout_s=timeout_s)


def redacting(word: str) -> Callable[[OutputReport], OutputVerdict]:
    def decide(report: OutputReport) -> OutputVerdict:
        found = [{"detector": "secret_word", "text": word}]
        return OutputVerdict(decision={"allow": True, "reasons": [], "redact": found},
                             client_text=mask(report.text, found), revision="rev-2")
    return decide


def test_a_redacted_output_reaches_the_client_masked_and_the_log_keeps_both(client, store, model) -> None:
    probe = run_job(replace(checked_job(""), check_output=False), model, store)  # what the model says here
    word = probe.text.split()[0]
    gateway = Gateway(client, redacting(word))
    job = checked_job(gateway.channel)
    result = run(client, job, store, model)
    gateway.close()
    assert gateway.reports == [OutputReport(probe.text)]
    assert result.status == STATUS_COMPLETED and word not in result.text
    assert "[REDACTED:secret_word]" in result.text
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "completion"
    assert entry.payload["output"] == probe.text  # as generated (prompt_logging full)
    assert entry.payload["client_output"] == result.text
    decision = entry.body["output_decision"]
    assert decision["allow"] is True and decision["policy_revision"] == "rev-2"
    assert decision["findings"] == [{"detector": "secret_word", "hmac_sha256": DIGESTER.hexdigest(word)}]
    assert word not in str(entry.body)


def test_under_redacted_logging_the_log_masks_the_outputs_findings_too(client, store, model) -> None:
    probe = run_job(replace(checked_job(""), check_output=False), model, store)
    word = probe.text.split()[0]
    gateway = Gateway(client, redacting(word))
    job = checked_job(gateway.channel, prompt_logging="redacted")
    run(client, job, store, model)
    gateway.close()
    entry = store.terminal_for(job.request_id)
    assert word not in entry.payload["output"] and word not in entry.payload["client_output"]
    assert entry.body["output_masked"] is True


@pytest.mark.parametrize("logging", ["redacted", "full"])
def test_a_finding_the_client_may_receive_is_masked_in_a_redacted_log(client, store, model, logging: str) -> None:
    """The output rules let an email through to an admin (action allow); its request, logged ``redacted`` for
    the email in its prompt, kept the output's email in clear (probe s55): the verdict's ``log_redact``
    findings are masked in the log's copies, not in what the client receives."""
    probe = run_job(replace(checked_job(""), check_output=False), model, store)
    word = probe.text.split()[0]

    def allow_but_log_masked(report: OutputReport) -> OutputVerdict:
        return OutputVerdict(decision={"allow": True, "reasons": [], "redact": [],
                                       "log_redact": [{"detector": "email", "text": word}]},
                             client_text=report.text, revision="rev-2")

    gateway = Gateway(client, allow_but_log_masked)
    job = checked_job(gateway.channel, prompt_logging=logging)
    result = run(client, job, store, model)
    gateway.close()
    assert result.status == STATUS_COMPLETED and result.text == probe.text  # the client gets it as it is
    entry = store.terminal_for(job.request_id)
    if logging == "full":
        assert entry.payload["output"] == entry.payload["client_output"] == probe.text
        return
    assert word not in entry.payload["output"] and word not in entry.payload["client_output"]
    assert "[REDACTED:email]" in entry.payload["output"] and "[REDACTED:email]" in entry.payload["client_output"]
    assert entry.body["output_masked"] is True and entry.body["client_output_masked"] is True
    assert entry.body["output_decision"]["findings"] == []  # the client's text was masked for nothing
    assert word not in str(entry.body)


def test_a_stopped_output_is_a_completion_with_the_content_filter_finish(client, store, model) -> None:
    def stop(report: OutputReport) -> OutputVerdict:
        return OutputVerdict(decision={"allow": False, "reasons": [{"code": "output_blocked", "message": "no"}],
                                       "redact": []}, client_text="", stopped=True)
    gateway = Gateway(client, stop)
    job = checked_job(gateway.channel)
    result = run(client, job, store, model)
    gateway.close()
    assert (result.status, result.text, result.finish_reason) == (STATUS_COMPLETED, "", "content_filter")
    entry = store.terminal_for(job.request_id)
    assert entry.body["finish_reason"] == "content_filter"
    assert entry.body["output_decision"]["reasons"] == [{"code": "output_blocked", "message": "no"}]
    assert entry.payload["client_output"] == "" and entry.payload["output"] == gateway.reports[0].text != ""


@pytest.mark.parametrize("stream", [False, True])
def test_under_redacted_logging_a_stopped_stream_keeps_its_unjudged_tail_as_a_digest(client, store, model,
                                                                                      stream: bool) -> None:
    """A stream's worker generates on after the stopping window, and nobody judges that tail: a redacted log
    kept it with its findings in clear (h12, F2). A non-streamed output is judged whole: masked as before."""
    probe = run_job(replace(checked_job(""), check_output=False), model, store)
    word = probe.text.split()[0]

    def stop(report: OutputReport) -> OutputVerdict:
        return OutputVerdict(decision={"allow": False, "reasons": [{"code": "output_blocked", "message": "no"}],
                                       "redact": [{"detector": "secret_word", "text": word}]},
                             client_text="", stopped=True)
    gateway = Gateway(client, stop)
    job = checked_job(gateway.channel, stream=stream, prompt_logging="redacted")
    run(client, job, store, model)
    gateway.close()
    entry = store.terminal_for(job.request_id)
    assert entry.body["finish_reason"] == "content_filter"
    if stream:
        assert "output" not in (entry.payload or {}) and entry.body["output_withheld"] is True
        assert entry.body["output_chars"] == len(gateway.reports[0].text)
    else:
        assert word not in entry.payload["output"] and entry.body["output_masked"] is True
        assert "output_withheld" not in entry.body


def test_under_redacted_logging_an_output_no_verdict_judged_is_kept_as_a_digest(client, store, model) -> None:
    """No verdict came (the gateway gone): the output rules' findings are unknown, a redacted log cannot mask
    them; the prompt's findings alone were masked before (h12, F1: a cancelled or timed-out stream too)."""
    gateway = Gateway(client, lambda report: None)
    job = checked_job(gateway.channel, prompt_logging="redacted")
    result = run(client, job, store, model, timeout_s=0.3)
    gateway.close()
    assert result.error["code"] == "output_unchecked"
    entry = store.terminal_for(job.request_id)
    assert "output" not in (entry.payload or {}) and entry.body["output_withheld"] is True
    assert entry.body["output_chars"] > 0


def test_an_unavailable_verdict_fails_the_request_and_keeps_the_output(client, store, model) -> None:
    def unavailable(report: OutputReport) -> OutputVerdict:
        return OutputVerdict(decision={"allow": False, "reasons": [{"code": "policy_unavailable", "message": "x"}],
                                       "redact": []}, client_text="", stopped=True, unavailable=True)
    gateway = Gateway(client, unavailable)
    job = checked_job(gateway.channel)
    result = run(client, job, store, model)
    gateway.close()
    assert result.status == STATUS_FAILED and result.text == ""
    assert result.error["code"] == "output_policy_unavailable"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "failed" and entry.payload["output"] == gateway.reports[0].text


def test_a_cancelled_answer_records_the_stream_cancelled_with_what_its_client_received(client, store, model) -> None:
    """The stream's client left while its gateway judged the last window: what was released is all it got."""
    probe = run_job(replace(checked_job(""), check_output=False), model, store)
    word = probe.text.split()[0]

    def cancelled(report: OutputReport) -> OutputVerdict:  # the windows before the last one were judged
        found = [{"detector": "secret_word", "text": word}]
        return OutputVerdict(decision={"allow": True, "reasons": [], "redact": found},
                             client_text=mask(report.text[:len(report.text) // 2], found), revision="rev-2",
                             cancelled=True)
    gateway = Gateway(client, cancelled)
    job = checked_job(gateway.channel, stream=True, prompt_logging="redacted")
    result = run(client, job, store, model)
    gateway.close()
    assert result.status == "cancelled" and result.error["code"] == "cancelled"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "cancelled" and entry.body["finish_reason"] is None
    assert entry.payload["client_output"] == result.text == cancelled(gateway.reports[0]).client_text != ""
    # The last window was never judged: its findings are unknown, so a redacted log cannot mask them and keeps
    # the output as a digest (it kept it masked by the earlier windows' findings only: h12, F1)
    assert "output" not in entry.payload and entry.body["output_withheld"] is True
    assert entry.body["output_chars"] == len(probe.text) and entry.body["output_hmac_sha256"]
    assert entry.body["usage"]["completion_tokens"] == probe.completion_tokens  # charged what it generated
    assert entry.body["output_decision"]["policy_revision"] == "rev-2"
    assert entry.body["timings"]["verdict_ms"] >= 0


def test_without_a_verdict_in_time_the_output_is_recorded_unchecked_and_not_served(client, store, model) -> None:
    gateway = Gateway(client, lambda report: None)  # a gateway that died after it queued the job
    job = checked_job(gateway.channel)
    result = run(client, job, store, model, timeout_s=0.3)
    gateway.close()
    assert result.status == STATUS_FAILED and result.text == "" and result.error["code"] == "output_unchecked"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "failed" and entry.payload["output"] == gateway.reports[0].text


def test_a_redelivery_is_answered_with_what_the_client_received(client, store, model) -> None:
    probe = run_job(replace(checked_job(""), check_output=False), model, store)
    word = probe.text.split()[0]
    gateway = Gateway(client, redacting(word))
    job = checked_job(gateway.channel)
    first = run(client, job, store, model)
    gateway.close()
    again = run(client, job, store, model, timeout_s=0.3)  # the claim says started: answered from the log
    assert again.text == first.text and word not in again.text


def test_a_verdict_that_comes_after_the_first_wait_step_is_still_taken(client, store, model, monkeypatch) -> None:
    # The first BLPOP rides with the report's PUBLISH; a verdict slower than one step is read by a later one.
    monkeypatch.setattr(streams, "VERDICT_POLL_S", 0.05)
    released = threading.Event()

    def slow(report: OutputReport) -> OutputVerdict:
        released.wait(0.5)  # several steps pass while nothing answers
        return redacting(report.text.split()[0])(report)

    gateway = Gateway(client, slow)
    job = checked_job(gateway.channel)
    result = run(client, job, store, model, timeout_s=10.0)
    gateway.close()
    word = gateway.reports[0].text.split()[0]
    assert result.status == STATUS_COMPLETED and word not in result.text
    assert store.terminal_for(job.request_id).body["output_decision"]["policy_revision"] == "rev-2"


def test_no_time_left_reports_the_output_and_records_it_unchecked_without_blocking(client, store, model) -> None:
    # A BLPOP timeout that rounds down to 0 ms would block for ever: none is sent.
    gateway = Gateway(client, lambda report: None)
    job = checked_job(gateway.channel)
    result = run(client, job, store, model, timeout_s=0.0)
    gateway.close()
    assert result.status == STATUS_FAILED and result.error["code"] == "output_unchecked"
    assert len(gateway.reports) == 1 and not client.exists(verdict_key(job.request_id))


def test_under_a_revision_without_output_rules_the_worker_records_the_allow_without_asking(client, store,
                                                                                          model) -> None:
    # The gateway knew the admitting revision has no output rule: no report, no wait, the same entry.
    listener = client.pubsub()
    channel = f"govgate:gateway:{uuid.uuid4().hex}"
    listener.subscribe(channel)
    listener.get_message(timeout=5)  # the subscribe confirmation
    job = checked_job(channel, output_rule_absent=True)
    result = run(client, job, store, model, timeout_s=30.0)
    heard = listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
    listener.close()
    assert heard is None  # nothing was reported (a result is published by the task wrapper, not run_job)
    entry = store.terminal_for(job.request_id)
    assert result.status == STATUS_COMPLETED and result.text and entry.kind == "completion"
    assert entry.body["output_decision"] == {"allow": True, "reasons": [], "findings": [], "stopped": False,
                                             "policy_revision": "rev"}
    assert entry.payload["client_output"] == entry.payload["output"] == result.text
    assert entry.body["finish_reason"] != "content_filter" and "error" not in entry.body


def handed_over_run(client: redis.Redis, job: GenerateJob, store, model, timeout_s: float = 10.0):
    """``run`` with the pending terminals a pool process has (a hand-over keeps its fallback there)."""
    pending = PendingTerminals(client, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    channel = RedisJobChannel(client, job.request_id, streaming=job.stream, sealer=SEALER, reply_to=job.reply_to)
    return run_job(job, model, store, channel, pending, digester=DIGESTER, verdict_timeout_s=timeout_s), pending


def test_a_job_its_gateway_records_is_handed_over_with_a_fallback_and_no_wait(client, store, model) -> None:
    gateway = Gateway(client, lambda report: None)  # hears the report; sends no verdict (none is awaited)
    job = checked_job(gateway.channel, gateway_records=True)
    started = time.monotonic()
    result, pending = handed_over_run(client, job, store, model, timeout_s=30.0)
    assert time.monotonic() - started < 30  # it did not wait out the verdict timeout
    gateway.close()
    assert result is HANDED_OVER and store.terminal_for(job.request_id) is None
    [report] = gateway.reports
    generated = Generated.from_payload(report.text, report.handed_over)
    assert generated.completion_tokens > 0 and generated.worker["pid"] == os.getpid()
    assert generated.generate_ms > 0 and generated.ended_ns > 0
    assert not client.exists(verdict_key(job.request_id))
    raw = client.hget(PENDING_KEY, job.request_id)
    assert raw is not None and report.text.encode() not in raw  # kept sealed
    kept = json.loads(SEALER.unseal(raw))["report"]  # the report beside it, for a gateway that lost it
    assert kept == {"output": report.text, "handed_over": report.handed_over}
    assert pending.write_all(store) == 0  # not due: its gateway may still record the end
    fallback = pending.write_one(store, job.request_id)  # as the gateway's timeout would write it
    assert fallback.kind == "failed" and fallback.body["error"]["code"] == "output_unchecked"
    assert fallback.payload["output"] == report.text and "output_decision" not in fallback.body


def test_a_hand_over_nobody_can_hear_is_recorded_unchecked_at_once(client, store, model) -> None:
    job = checked_job("", gateway_records=True)  # no reply channel: nobody to hand the output to
    result, pending = handed_over_run(client, job, store, model)
    assert result.status == STATUS_FAILED and result.error["code"] == "output_unchecked"
    assert store.terminal_for(job.request_id).kind == "failed" and not pending.holds(job.request_id)


def test_a_stream_is_never_handed_over(client, store, model) -> None:
    gateway = Gateway(client, redacting("the"))
    job = checked_job(gateway.channel, gateway_records=True, stream=True)
    result, pending = handed_over_run(client, job, store, model)
    gateway.close()
    assert result is not HANDED_OVER and result.audit_seq is not None
    assert gateway.reports[0].handed_over is None and not pending.holds(job.request_id)


def test_a_report_no_gateway_hears_is_recorded_unchecked_without_waiting_out_the_verdict(
        client, store, model, redis_server, monkeypatch) -> None:
    """A stream whose gateway was killed while the job waited: nobody can answer its report, so the worker
    does not hold the model for the whole verdict timeout. Counted in BLPOPs, not timed: with steps of
    0.05 s in a 2 s wait, a worker that waited would send about forty."""
    monkeypatch.setattr(streams, "VERDICT_POLL_S", 0.05)
    job = checked_job(f"govgate:gateway:{uuid.uuid4().hex}", stream=True)  # a channel nobody listens on
    probe = CommandProbe(redis_server.url)
    client.ping()
    probe.start()
    result = run(client, job, store, model, timeout_s=2.0)
    calls = probe.stop()
    assert result.status == STATUS_FAILED and result.error["code"] == "output_unchecked"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "failed" and entry.body["error"]["code"] == "output_unchecked"
    assert calls.get("blpop") == 1
    assert client.llen(verdict_key(job.request_id)) == 0  # the empty item that ended the wait was taken


class Carrier:
    """The solo pool's transport channel as a carried hand-over sees it: it keeps what it is given."""

    def __init__(self) -> None:
        self.carried: list = []

    def carry(self, hand_over) -> None:
        self.carried.append(hand_over)


def carried_run(client: redis.Redis, job: GenerateJob, store, model):
    """``handed_over_run`` on the solo pool: the hand-over is left with a carrier; ends recorded after the
    job returned go to ``late``."""
    pending = PendingTerminals(client, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    carrier, late = Carrier(), []
    channel = RedisJobChannel(client, job.request_id, streaming=job.stream, sealer=SEALER, reply_to=job.reply_to,
                              carrier=carrier, deliver_late=late.append)
    result = run_job(job, model, store, channel, pending, digester=DIGESTER, verdict_timeout_s=30.0)
    return result, pending, carrier, late


def test_a_carried_hand_over_sends_nothing_until_its_take_and_alone_hands_the_output_over(
        client, store, model) -> None:
    """On the solo pool the job returns with its hand-over left to the take its ack sends: nothing is in
    Redis yet. A take that failed has it sent on its own: the fallback kept, the report heard, no entry
    written by the worker (its gateway records the end)."""
    gateway = Gateway(client, lambda report: None)
    job = checked_job(gateway.channel, gateway_records=True)
    result, pending, carrier, late = carried_run(client, job, store, model)
    assert result is HANDED_OVER and not gateway.reports and not pending.holds(job.request_id)
    [hand_over] = carrier.carried
    assert hand_over.request_id == job.request_id and hand_over.reply_to == gateway.channel
    hand_over.send_alone()
    gateway.close()
    [report] = gateway.reports
    assert report.handed_over is not None and pending.holds(job.request_id)
    assert late == [] and store.terminal_for(job.request_id) is None


def test_a_carried_hand_over_redis_refuses_again_is_recorded_unchecked_and_delivered_once(
        client, store, model) -> None:
    """The take that carried it failed and Redis refuses the hand-over on its own too (full: maxmemory
    under noeviction): the job's output was kept until then, so the worker records ``output_unchecked``
    itself and delivers that end, as a refused hand-over always did."""
    gateway = Listener(client)
    job = checked_job(gateway.channel, gateway_records=True)
    result, pending, carrier, late = carried_run(client, job, store, model)
    assert result is HANDED_OVER
    [hand_over] = carrier.carried
    client.config_set("maxmemory", "1")
    try:
        hand_over.send_alone()
    finally:
        client.config_set("maxmemory", "0")
    assert gateway.heard() == [] and not pending.holds(job.request_id)
    gateway.close()
    [ended] = late
    assert ended.status == STATUS_FAILED and ended.error["code"] == "output_unchecked"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "failed" and entry.body["error"]["code"] == "output_unchecked"
    assert ended.audit_seq == entry.seq


def test_a_hand_over_a_full_redis_refuses_publishes_no_report_and_is_recorded_unchecked(client, store, model) -> None:
    """The hand-over's own round trip (a prefork pool process) under a full Redis: the fallback's write
    is refused, so the report must not go out either (a full Redis still allows a PUBLISH): the gateway
    would record the output while the worker records it unchecked."""

    class FullAtHandOver(RedisJobChannel):
        def hand_over(self, *args, **kwargs):  # Redis fills up once the output is made
            client.config_set("maxmemory", "1")
            return super().hand_over(*args, **kwargs)

    gateway = Listener(client)
    job = checked_job(gateway.channel, gateway_records=True)
    pending = PendingTerminals(client, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    channel = FullAtHandOver(client, job.request_id, streaming=False, sealer=SEALER, reply_to=job.reply_to)
    try:
        result = run_job(job, model, store, channel, pending, digester=DIGESTER, verdict_timeout_s=30.0)
    finally:
        client.config_set("maxmemory", "0")
    assert result.status == STATUS_FAILED and result.error["code"] == "output_unchecked"
    assert gateway.heard() == [] and not pending.holds(job.request_id)
    gateway.close()
    assert store.terminal_for(job.request_id).kind == "failed"


class _CancelledMidStream(RedisJobChannel):
    """A stream's channel whose gateway cancels the request after its first piece, as a client that leaves
    (or a stopping gateway's drain) makes it: the ``cancelled`` verdict first, then the cancel flag."""

    def __init__(self, *args, verdict: OutputVerdict | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._verdict = verdict
        self._told = False

    def publish(self, text: str) -> None:
        super().publish(text)
        if not self._told:
            self._told = True
            if self._verdict is not None:
                self._client.lpush(verdict_key(self._request_id), self._verdict.sealed(SEALER))

    def cancel_requested(self) -> bool:
        return self._told


def _cut_midway(client, store, model, channel: type, verdict: OutputVerdict | None, *,
                checked: bool = True) -> tuple:
    """Run a 200-token stream on ``channel`` (a class above: its gateway cuts it after the first piece); the
    job's result, and the job."""
    job = replace(checked_job("govgate:gateway:nobody", stream=True),
                  params=SamplingParams(max_tokens=200, temperature=0), check_output=checked)
    made = channel(client, job.request_id, streaming=True, sealer=SEALER, reply_to=job.reply_to, verdict=verdict)
    return run_job(job, model, store, made, digester=DIGESTER, verdict_timeout_s=5), job

def test_a_stream_cancelled_mid_generation_records_what_its_gateway_says_the_client_received(client, store,
                                                                                             model) -> None:
    """The worker cannot know what its gateway released (it held text back to judge it): the gateway's
    ``cancelled`` verdict says it, and the cancelled entry keeps it. Without one, a stream cut by a stopped
    gateway had no ``client_output`` (h9 F3)."""
    received = "what the gateway released"
    verdict = OutputVerdict(decision={"allow": True, "reasons": [], "redact": []}, client_text=received,
                            revision="rev-2", cancelled=True)
    result, job = _cut_midway(client, store, model, _CancelledMidStream, verdict)
    assert result.status == "cancelled"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "cancelled" and entry.body["error"]["code"] == "cancelled"
    assert entry.payload["client_output"] == received
    assert entry.payload["output"]  # what was generated before the cancel, kept beside it
    assert entry.body["output_decision"]["policy_revision"] == "rev-2"
    assert entry.body["usage"]["completion_tokens"] >= 1
    assert client.llen(verdict_key(job.request_id)) == 0  # taken


def test_a_stream_cancelled_without_a_verdict_is_recorded_as_before(client, store, model) -> None:
    """A gateway that set only the cancel flag (an older one): cancelled, the output kept, no client_output."""
    result, job = _cut_midway(client, store, model, _CancelledMidStream, None)
    assert result.status == "cancelled"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "cancelled" and "client_output" not in entry.payload and entry.payload["output"]


def test_a_stream_without_a_verdict_does_not_claim_nothing_was_served(client, store, model) -> None:
    """Its gateway released judged windows as they came; a worker left without a verdict (its gateway killed)
    cannot know how much, and its entry says so rather than "neither checked nor served" (h9 F3)."""
    gateway = Gateway(client, lambda report: None)
    job = checked_job(gateway.channel, stream=True)
    result = run(client, job, store, model, timeout_s=0.3)
    gateway.close()
    assert result.status == STATUS_FAILED and result.error["code"] == "output_unchecked"
    entry = store.terminal_for(job.request_id)
    message = entry.body["error"]["message"]
    assert "nor served" not in message and "not known" in message
    assert entry.payload["output"] == gateway.reports[0].text


class _TimedOutMidStream(_CancelledMidStream):
    """The same, its gateway's request timeout stopping it: the cancel flag is ``timed-out``."""

    def stopped_by_timeout(self) -> bool:
        return self._told


def test_a_stream_its_gateway_timed_out_mid_generation_records_timed_out_with_what_the_client_received(
        client, store, model) -> None:
    """The timeout's stop used to leave the entry without ``client_output`` and decision (probe p2 #3): the
    gateway now sends the ``cancelled`` verdict marked ``timed_out`` first, and the entry is ``timed_out``
    (the gateway's timeout message, the worker's counts) with both."""
    from workers.generation import GATEWAY_TIMEOUT_MESSAGE

    received = "what the gateway released before its timeout"
    verdict = OutputVerdict(decision={"allow": True, "reasons": [], "redact": []}, client_text=received,
                            revision="rev-2", cancelled=True, timed_out=True)
    result, job = _cut_midway(client, store, model, _TimedOutMidStream, verdict)
    assert result.status == "timed_out"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "timed_out"
    assert entry.body["error"] == {"code": "timed_out", "message": GATEWAY_TIMEOUT_MESSAGE}
    assert entry.payload["client_output"] == received and entry.payload["output"]
    assert entry.body["output_decision"]["policy_revision"] == "rev-2"
    assert entry.body["usage"]["completion_tokens"] >= 1 and "basis" not in entry.body["usage"]
    assert client.llen(verdict_key(job.request_id)) == 0  # taken


def test_a_finished_stream_whose_gateway_timed_out_before_its_verdict_records_timed_out(client, store,
                                                                                        model) -> None:
    """The worker reported and waits; its gateway's timeout came first, so the verdict it finds is the
    timed-out one: ``timed_out`` with what the client received, not a completion."""
    def timed_out(report: OutputReport) -> OutputVerdict:
        return OutputVerdict(decision={"allow": True, "reasons": [], "redact": []},
                             client_text=report.text[:len(report.text) // 2], revision="rev-2", cancelled=True,
                             timed_out=True)
    gateway = Gateway(client, timed_out)
    job = checked_job(gateway.channel, stream=True)
    result = run(client, job, store, model)
    gateway.close()
    assert result.status == "timed_out" and result.error["code"] == "timed_out"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "timed_out" and entry.body["finish_reason"] is None
    assert entry.payload["client_output"] == result.text == timed_out(gateway.reports[0]).client_text


def test_timed_out_travels_only_with_cancelled() -> None:
    """The mark is a kind of cancel: a verdict that is not one never carries it (nor reads it)."""
    plain = OutputVerdict(decision={"allow": True}, client_text="x", timed_out=True)
    assert "timed_out" not in plain.to_payload()
    assert OutputVerdict.opened(plain.sealed(SEALER), SEALER).timed_out is False
    marked = replace(plain, cancelled=True)
    assert OutputVerdict.opened(marked.sealed(SEALER), SEALER) == marked


class _RevokedMidStream(_CancelledMidStream):
    """The same, its key revoked: after the verdict (marked ``key_revoked``), the job's real cancel key set to
    ``key-revoked``, read by the channel's own look (the piece waits out the look's interval)."""

    def publish(self, text: str) -> None:
        first = not self._told
        super().publish(text)
        if first:
            self._client.set(cancel_key(self._request_id), STOP_KEY_REVOKED)
            time.sleep(2 * streams.CANCEL_CHECK_INTERVAL_S)

    cancel_requested = RedisJobChannel.cancel_requested


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
def test_a_stream_whose_key_was_revoked_mid_generation_says_so_in_its_end(client, store, model, checked) -> None:
    """The revocation's stop (s57, probe s56 B-F1) is a cancel whose entry names it, with what the client
    received for a checked stream (the verdict's), the generated output kept beside it either way."""
    received = "what the gateway released before the revocation"
    verdict = OutputVerdict(decision={"allow": True, "reasons": [], "redact": []}, client_text=received,
                            revision="rev-2", cancelled=True, key_revoked=True) if checked else None
    result, job = _cut_midway(client, store, model, _RevokedMidStream, verdict, checked=checked)
    assert result.status == "cancelled"
    entry = store.terminal_for(job.request_id)
    assert entry.kind == "cancelled" and entry.body["error"]["code"] == "cancelled"
    assert KEY_REVOKED_MESSAGE in entry.body["error"]["message"]
    assert entry.payload["output"]
    if checked:
        assert entry.payload["client_output"] == received
        assert entry.body["output_decision"]["policy_revision"] == "rev-2"


def test_a_job_whose_key_was_revoked_while_it_waited_is_not_generated_and_its_end_says_why(client, store,
                                                                                            model) -> None:
    """Its gateway could not take it back (a worker had just taken it): the worker's start finds the
    ``key-revoked`` cancel and records ``cancelled`` naming the revocation, nothing generated."""
    job = replace(checked_job("govgate:gateway:nobody"), check_output=False)
    client.set(cancel_key(job.request_id), STOP_KEY_REVOKED)
    channel = RedisJobChannel(client, job.request_id, streaming=False, sealer=SEALER, reply_to=job.reply_to)
    result = run_job(job, model, store, channel, digester=DIGESTER)
    assert result.status == "cancelled"
    entry = store.terminal_for(job.request_id)
    assert entry.body["error"] == {"code": "cancelled", "message": KEY_REVOKED_MESSAGE}
    assert entry.body["usage"]["completion_tokens"] == 0


def test_a_verdict_says_key_revoked_only_with_cancelled() -> None:
    """The field travels sealed with the verdict, and only on a cancelled one (an older worker ignores it)."""
    revoked = OutputVerdict(decision={"allow": True, "reasons": [], "redact": []}, client_text="x",
                            cancelled=True, key_revoked=True)
    assert OutputVerdict.opened(revoked.sealed(SEALER), SEALER).key_revoked is True
    plain = OutputVerdict(decision={"allow": True, "reasons": [], "redact": []}, client_text="x", key_revoked=True)
    assert "key_revoked" not in plain.to_payload()
    assert OutputVerdict.opened(plain.sealed(SEALER), SEALER).key_revoked is False
