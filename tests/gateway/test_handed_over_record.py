"""The gateway's record of a handed-over output when the database refuses it, or the request ended first.

Real parts: a SQLite audit store of the test's own whose inserts a trigger
refuses (a real refusal from the database), a Redis of its own holding the
worker's fallback the way ``workers/generation.py`` keeps it. The served
path (a completion handed over, recorded once, its fallback dropped) is in
``tests/e2e/test_output_rules.py``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import text

from audit import AuditStore, DuplicateTerminalError
from gateway.auth import Principal
from gateway.components import open_database
from gateway.requests.fallback_drops import FallbackDrops
from gateway.requests.handed_over import HandedOver, report_of
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.jobs import GenerateJob
from workers.contract.output_check import OutputReport, OutputVerdict
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.contract.terminal_body import Generated, checked_ending, generation_body

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))
DIGESTER = Digester(os.urandom(32))


@pytest.fixture
async def parts(own_redis, tmp_path):
    engine = open_database(own_redis.with_(database_url=f"sqlite:///{tmp_path / 'handed.db'}"))
    client = redis.Redis.from_url(own_redis.redis_url)
    pending = PendingTerminals(client, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    store = AuditStore(engine)
    request_log = RequestLog(store, current_revision=lambda: "rev", digester=DIGESTER, pending=pending)
    yield store, client, pending, request_log
    await request_log.aclose()  # its append thread ends (left running, it made later tests' forks unsafe)
    client.close()
    engine.dispose()


def ticket_for(request_id: str) -> Ticket:
    job = GenerateJob(request_id=request_id, model="tiny", endpoint="completions", params=SamplingParams(8),
                      principal="ann", team="ops", policy_revision="rev", prompt="Once", check_output=True,
                      gateway_records=True)
    return Ticket(request_id=request_id, principal=Principal("ann", "ops", ("analyst",), "k1"), model="tiny",
                  created=int(time.time()), job=job)


def handed_over_body(ticket: Ticket, *, fallback: bool) -> tuple[str, dict]:
    generated = Generated("the output as generated", 3, 5, "length", {"hostname": "w", "pid": 1}, 2.0, 9.0)
    verdict = None if fallback else OutputVerdict.unruled(generated.output, "rev")
    ending = checked_ending(ticket.job, verdict, generated.finish_reason, DIGESTER)
    return ending.kind, generation_body(ticket.job, generated, DIGESTER, checked=ending.checked,
                                        finish_reason=ending.finish_reason, error=ending.error)


def keep_fallback(pending: PendingTerminals, ticket: Ticket) -> None:
    kind, body = handed_over_body(ticket, fallback=True)
    pending.keep(PendingTerminal(kind=kind, request_id=ticket.request_id, principal="ann", team="ops",
                                 model="tiny", body=body, policy_revision="rev", not_before=time.time() + 60))


async def test_a_refused_record_takes_the_fallbacks_place_and_is_written_when_the_database_is_back(parts):
    store, client, pending, request_log = parts
    ticket = ticket_for("handed-1")
    keep_fallback(pending, ticket)
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
    kind, body = handed_over_body(ticket, fallback=False)
    assert kind == "completion"
    assert await request_log.record_end(ticket, kind, body) is None
    assert store.terminal_for("handed-1") is None and pending.holds("handed-1")
    with store.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_insert"))
    assert pending.write_all(store) == 1  # due at once: not the fallback's not_before
    written = store.terminal_for("handed-1")
    assert written.kind == "failed" and written.body["ended_as"] == "completion"
    assert written.body["error"]["code"] == "audit_unavailable"
    assert "output_decision" in written.body and written.payload["output"] == "the output as generated"
    assert not client.hexists(PENDING_KEY, "handed-1")


async def test_a_request_that_ended_first_leaves_the_gateways_record_refused(parts):
    store, client, pending, request_log = parts
    ticket = ticket_for("handed-2")
    keep_fallback(pending, ticket)
    pending.write_one(store, "handed-2")  # the gateway's own timeout wrote the fallback meanwhile
    kind, body = handed_over_body(ticket, fallback=False)
    with pytest.raises(DuplicateTerminalError):
        await request_log.record_end(ticket, kind, body)
    assert [e.kind for e in store.entries_for("handed-2")] == ["failed"]


def fallback_entry(ticket: Ticket, output: str, *, logging: str, redact=()) -> dict:
    """A fallback's fields as the worker keeps them (``workers/generation.py``, ``_hand_over``)."""
    job = replace(ticket.job, prompt_logging=logging, redact=list(redact))
    generated = Generated(output, 3, 5, "length", {"hostname": "w", "pid": 1}, 2.0, 9.0)
    ending = checked_ending(job, None, generated.finish_reason, DIGESTER)
    body = generation_body(job, generated, DIGESTER, finish_reason=ending.finish_reason, error=ending.error)
    return asdict(PendingTerminal(kind=ending.kind, request_id=ticket.request_id, principal="ann", team="ops",
                                  model="tiny", body=body, policy_revision="rev", not_before=time.time() + 60))


def test_a_fallback_that_keeps_the_output_as_generated_stands_for_its_report():
    ticket = ticket_for("handed-3")
    for logging, redact in (("full", ()),):  # redacted keeps an unjudged output as a digest (below)
        entry = fallback_entry(ticket, "the output as generated", logging=logging, redact=redact)
        report = report_of(entry)
        assert report is not None and report.text == "the output as generated", logging
        generated = Generated.from_payload(report.text, report.handed_over)
        assert (generated.prompt_tokens, generated.completion_tokens, generated.finish_reason) == (3, 5, "length")
        assert (generated.queue_ms, generated.generate_ms, generated.worker["pid"]) == (2.0, 9.0, 1)
        assert abs(generated.ended_ns / 1e9 - entry["since"]) < 1e-3


def test_a_fallback_with_its_report_kept_beside_it_stands_for_that_report_whatever_the_logging():
    ticket = ticket_for("handed-3b")
    generated = Generated("the output as generated", 3, 5, "length", {"hostname": "w", "pid": 1}, 2.0, 9.0, 123)
    for logging in ("hash", "redacted", "full"):
        entry = fallback_entry(ticket, generated.output, logging=logging)
        entry["report"] = {"output": generated.output, "handed_over": generated.to_payload()}
        report = report_of(entry)
        assert report is not None and report.text == generated.output, logging
        assert Generated.from_payload(report.text, report.handed_over) == generated
    unreadable = {**fallback_entry(ticket, "x", logging="hash"), "report": {"output": "x", "handed_over": {}}}
    assert report_of(unreadable) is None


def test_a_fallback_that_keeps_a_digest_or_a_masked_output_stands_for_no_report():
    ticket = ticket_for("handed-4")
    assert report_of(fallback_entry(ticket, "the output as generated", logging="hash")) is None
    # A fallback's output was never judged: under redacted its findings are unknown, so it is kept as a digest
    # (it was kept masked by the prompt's findings alone, the output's in clear: h12), and stands for no report
    for output in ("write to ann@example.org", "the output as generated"):
        withheld = fallback_entry(ticket, output, logging="redacted",
                                  redact=[{"detector": "email", "text": "ann@example.org"}])
        assert withheld["body"]["output_withheld"] is True and "output" not in withheld["body"]
        assert report_of(withheld) is None
    assert report_of({"body": {"output": "x", "usage": "not an object"}}) is None
    assert report_of({"kind": "failed"}) is None



@pytest.fixture
async def recorder(parts, own_redis):
    """The gateway's recorder of handed-over outputs, on the test's store and Redis."""
    client = aioredis.Redis.from_url(own_redis.redis_url)
    # No rules: they judge only an output its fallback holds as generated; these fallbacks hold digests.
    recorder = HandedOver(rules=None, request_log=parts[3], drops=FallbackDrops(client),  # type: ignore[arg-type]
                          digester=DIGESTER)
    yield recorder
    await recorder.aclose()
    await client.aclose()


def keep_hashed_fallback(pending: PendingTerminals, ticket: Ticket) -> dict:
    entry = fallback_entry(ticket, "the output as generated", logging="hash")
    assert pending.keep(PendingTerminal(**entry))
    return entry


async def test_a_fallback_that_cannot_be_judged_is_written_now(parts, recorder):
    store, client, pending, _ = parts
    ticket = ticket_for("handed-5")
    entry = keep_hashed_fallback(pending, ticket)
    result = await recorder.record_fallback(ticket, HoldBack(16), entry)
    [terminal] = [e for e in store.entries_for("handed-5")]
    assert terminal.kind == "failed" and "recorded_late" in terminal.body
    assert (result.status, result.error["code"], result.audit_seq) == ("failed", "output_unchecked", terminal.seq)
    assert (result.prompt_tokens, result.completion_tokens) == (3, 5)
    assert not client.hexists(PENDING_KEY, "handed-5")


async def test_a_fallback_written_first_by_a_retry_is_the_answer_once(parts, recorder):
    store, client, pending, _ = parts
    ticket = ticket_for("handed-6")
    entry = keep_hashed_fallback(pending, ticket)
    written = pending.write_one(store, "handed-6")  # a retry (the worker's thread) wrote it meanwhile
    result = await recorder.record_fallback(ticket, HoldBack(16), entry)
    assert [e.kind for e in store.entries_for("handed-6")] == ["failed"]
    assert result.audit_seq == written.seq and result.error["code"] == "output_unchecked"


async def test_a_fallback_the_database_refuses_stays_kept_and_the_client_hears_so(parts, recorder):
    store, client, pending, _ = parts
    ticket = ticket_for("handed-7")
    entry = keep_hashed_fallback(pending, ticket)
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
    result = await recorder.record_fallback(ticket, HoldBack(16), entry)
    assert (result.status, result.error["code"], result.audit_seq) == ("failed", "audit_unavailable", None)
    assert (result.prompt_tokens, result.completion_tokens) == (3, 5)  # charged, as generated
    assert store.terminal_for("handed-7") is None and pending.holds("handed-7")


class _AllowingEngine:
    """A stand-in for the policy engine that allows every window: what is tested is the record, not the rule."""

    revision = "rev"

    async def decide_output_with_revision(self, document):
        return SimpleNamespace(allow=True, reasons=(), redact=(), log_redact=()), self.revision


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_record_keeps_what_the_client_received_not_the_whole_output(parts, own_redis, stream):
    """Probe h9 F3 (2): the audit store refused a stream's end, its last window was withheld (the client got
    the earlier windows, then ``audit_unavailable``), and the entry written later held the whole output as
    ``client_output``. It holds what the client received: a stream's released windows, a non-streamed
    request's nothing."""
    store, _client, pending, request_log = parts
    client = aioredis.Redis.from_url(own_redis.redis_url)
    rules = OutputRules(policy=_AllowingEngine(), redis=client, sealer=SEALER, holdback_chars=4,  # type: ignore[arg-type]
                        build_input=lambda ticket, window: {"text": window.text, "final": window.final})
    recorder = HandedOver(rules=rules, request_log=request_log, drops=FallbackDrops(client), digester=DIGESTER)
    request_id = f"handed-withheld-{stream}"
    ticket = ticket_for(request_id)
    ticket = replace(ticket, job=replace(ticket.job, stream=stream, prompt_logging="full"))
    keep_fallback(pending, ticket)
    hold = HoldBack(4)
    hold.add("Once upon a time ")
    await rules.judge(ticket, hold)  # a window released before the end (sent to a stream's client)
    released = hold.client_text
    assert released and released != "Once upon a time "
    generated = Generated("Once upon a time there was", 3, 5, "length", {"hostname": "w", "pid": 1}, 2.0, 9.0)
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    try:
        result = await recorder.record(ticket, hold, OutputReport(generated.output,
                                                                  handed_over=generated.to_payload()))
        assert result is not None and result.error["code"] == "audit_unavailable"
        with store.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse_insert"))
        assert pending.write_all(store) == 1
        written = store.terminal_for(request_id)
        assert written.kind == "failed" and written.body["ended_as"] == "completion"
        assert written.payload["output"] == "Once upon a time there was"
        assert written.payload["client_output"] == (released if stream else ""), written.payload
    finally:
        await recorder.aclose()
        await client.aclose()
