"""A stream's ``delivered`` entry (``gateway/requests/delivered.py``): written only when its end cannot say.

Real parts: a SQLite audit store of the test's own, written through the gateway's
:class:`RequestLog` (its append thread). The runner is a stand-in holding the three
parts :func:`record_delivered` reads (output rules, request log, digester); the served
path (Redis dying mid-stream) is in ``tests/e2e/test_stream_faults.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from audit import AuditError, AuditStore, make_engine, migrate
from gateway.auth import Principal
from gateway.requests.delivered import DeliveredLater, record_delivered, says_what_was_delivered
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from workers.contract.jobs import GenerateJob
from workers.contract.privacy import Digester
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer

pytestmark = pytest.mark.anyio

DIGESTER = Digester(os.urandom(32))
SENT = "what the client got"


@pytest.fixture
async def parts(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'delivered.db'}")
    migrate(engine)
    store = AuditStore(engine)
    request_log = RequestLog(store, current_revision=lambda: "rev", digester=DIGESTER)
    rules = OutputRules(policy=SimpleNamespace(revision="rev"), redis=None, sealer=Sealer(os.urandom(32)),
                        holdback_chars=8)
    # looks again only when the test says so (look_once), or at the interval if it never does
    later = DeliveredLater(interval_s=3600, horizon_s=3600)
    runner = SimpleNamespace(output_rules=rules, request_log=request_log, digester=DIGESTER, delivered_later=later)
    yield store, runner
    await later.aclose()
    await request_log.aclose()
    store.engine.dispose()


def ticket_for(request_id: str, prompt_logging: str = "full", *, check_output: bool = True,
               redact: list[dict[str, str]] | None = None) -> Ticket:
    job = GenerateJob(request_id=request_id, model="tiny", endpoint="completions", params=SamplingParams(64),
                      principal="ann", team="ops", policy_revision="rev", prompt="Once", check_output=check_output,
                      stream=True, prompt_logging=prompt_logging, redact=redact or [])
    return Ticket(request_id=request_id, principal=Principal("ann", "ops", ("analyst",), "k1"), model="tiny",
                  created=int(time.time()), job=job)


def requested(store: AuditStore, ticket: Ticket) -> None:
    store.append("request", ticket.request_id, principal="ann", team="ops", model="tiny", body={},
                 policy_revision="rev")


def end_of(store: AuditStore, ticket: Ticket, kind: str, body: dict, payload: dict | None = None):
    return store.append(kind, ticket.request_id, principal="ann", team="ops", model="tiny", body=body,
                        policy_revision="rev", payload=payload)


def ended(store: AuditStore, ticket: Ticket, kind: str, body: dict, payload: dict | None = None):
    requested(store, ticket)
    return end_of(store, ticket, kind, body, payload)


async def test_an_end_without_client_output_gets_what_the_client_received(parts):
    store, runner = parts
    ticket = ticket_for("d-1")
    end = ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}},
                {"output": SENT + " and the held-back rest"})
    assert not says_what_was_delivered(end)
    written = await record_delivered(runner, ticket, HoldBack(8), SENT)
    assert written is not None and written.kind == "delivered" and written.terminal_request_id is None
    assert [entry.kind for entry in store.entries_for("d-1")] == ["request", "failed", "delivered"]
    assert written.body["terminal_seq"] == end.seq and written.body["ended_as"] == "failed"
    assert written.body["output_decision"] == {"allow": True, "reasons": [], "findings": [], "stopped": False,
                                               "policy_revision": "rev"}
    assert written.payload["client_output"] == SENT and written.policy_revision == "rev"


async def test_an_end_that_says_it_already_gets_nothing(parts):
    store, runner = parts
    digest = {"client_output_chars": len(SENT), "client_output_hmac_sha256": DIGESTER.hexdigest(SENT)}
    for n, (body, payload, logging_level) in enumerate([
            ({"error": {"code": "cancelled"}}, {"client_output": SENT}, "full"), (digest, None, "hash")]):
        ticket = ticket_for(f"d-said-{n}", prompt_logging=logging_level)
        end = ended(store, ticket, "cancelled", body, payload)
        assert says_what_was_delivered(end)
        assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None
        assert [entry.kind for entry in store.entries_for(ticket.request_id)] == ["request", "cancelled"]


async def test_an_end_that_says_more_than_the_client_received_is_completed(parts):
    """A worker's kept end has the verdict's text as ``client_output``; the client got less (its gateway sent
    ``audit_unavailable`` instead of the last window): the ``delivered`` entry says what it got."""
    store, runner = parts
    more = SENT + " and the last window"
    cases = [("full", {}, {"client_output": more}, {"client_output": SENT}),
             ("hash", {"client_output_chars": len(more), "client_output_hmac_sha256": DIGESTER.hexdigest(more)}, None,
              {"client_output_chars": len(SENT), "client_output_hmac_sha256": DIGESTER.hexdigest(SENT)})]
    for n, (logging_level, said_in_body, said_in_payload, received) in enumerate(cases):
        ticket = ticket_for(f"d-more-{n}", prompt_logging=logging_level)
        end = ended(store, ticket, "failed", {"error": {"code": "audit_unavailable"}, **said_in_body}, said_in_payload)
        written = await record_delivered(runner, ticket, HoldBack(8), SENT)
        assert written is not None and written.body["terminal_seq"] == end.seq
        assert says_what_was_delivered(written) == received


async def test_a_digest_only_request_keeps_a_digest_of_what_the_client_received(parts):
    store, runner = parts
    ticket = ticket_for("d-hash", prompt_logging="hash")
    ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"},
                                    "output_chars": 40})
    written = await record_delivered(runner, ticket, HoldBack(8), SENT)
    assert written is not None and written.payload is None
    assert written.body["client_output_chars"] == len(SENT)
    assert written.body["client_output_hmac_sha256"] == DIGESTER.hexdigest(SENT)
    assert SENT not in str(written.to_document())


async def test_an_end_not_in_the_log_yet_is_waited_for_and_then_completed(parts, caplog):
    """The worker's end kept pending (the database refused it when the stream failed): the entry waits, in
    memory, and is appended once the end is in the log, naming it; a look before that keeps it waiting."""
    store, runner = parts
    later: DeliveredLater = runner.delivered_later
    caplog.set_level(logging.INFO, logger="gateway.requests.delivered")
    ticket = ticket_for("d-later")
    requested(store, ticket)
    assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None
    assert "d-later received waits for the request's end, not in the audit log yet" in caplog.text
    assert len(later) == 1
    await later.look_once()
    assert len(later) == 1 and [e.kind for e in store.entries_for("d-later")] == ["request"]
    end = end_of(store, ticket, "failed", {"error": {"code": "audit_unavailable", "message": "kept"}})
    await later.look_once()
    assert len(later) == 0 and "what the client of d-later received is recorded now" in caplog.text
    entries = store.entries_for("d-later")
    assert [e.kind for e in entries] == ["request", "failed", "delivered"]
    assert entries[-1].body["terminal_seq"] == end.seq and entries[-1].payload["client_output"] == SENT
    assert SENT not in caplog.text


async def test_an_end_that_comes_saying_what_the_client_received_gets_nothing_more(parts, caplog):
    """A worker's kept end written once the database is back says it when the worker had the verdict."""
    store, runner = parts
    later: DeliveredLater = runner.delivered_later
    caplog.set_level(logging.INFO, logger="gateway.requests.delivered")
    ticket = ticket_for("d-kept")
    requested(store, ticket)
    assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None and len(later) == 1
    end_of(store, ticket, "failed", {"error": {"code": "audit_unavailable", "message": "kept"},
                                     "ended_as": "completion"}, {"output": SENT, "client_output": SENT})
    await later.look_once()
    assert len(later) == 0 and "the entries of d-kept say what its client received already" in caplog.text
    assert [e.kind for e in store.entries_for("d-kept")] == ["request", "failed"]


async def test_a_refusing_database_leaves_the_entry_waiting_until_it_takes_it(parts, caplog):
    store, runner = parts
    later: DeliveredLater = runner.delivered_later
    caplog.set_level(logging.WARNING, logger="gateway.requests.delivered")
    ticket = ticket_for("d-refused")
    ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}})
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
    assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None
    assert "could not record what the client of d-refused received yet" in caplog.text and len(later) == 1
    await later.look_once()  # still refused: still waiting
    assert len(later) == 1 and [e.kind for e in store.entries_for("d-refused")] == ["request", "failed"]
    with store.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_insert"))
    await later.look_once()
    assert len(later) == 0
    assert [e.kind for e in store.entries_for("d-refused")] == ["request", "failed", "delivered"]
    assert SENT not in caplog.text


async def test_a_try_whose_commit_was_reported_failed_is_not_appended_again(parts, caplog):
    """The append committed, but its answer was lost (a PostgreSQL connection cut after COMMIT, played here by
    a wrapper that raises once the real append is done): the retry finds the entry and appends nothing."""
    store, runner = parts
    later: DeliveredLater = runner.delivered_later
    caplog.set_level(logging.INFO, logger="gateway.requests.delivered")
    append = runner.request_log.record_delivered
    lost: list[int] = []

    async def committed_then_lost(ticket: Ticket, body: dict):
        entry = await append(ticket, body)
        lost.append(entry.seq)
        raise AuditError("audit append failed: the connection was lost after COMMIT")

    runner.request_log.record_delivered = committed_then_lost
    ticket = ticket_for("d-ambiguous")
    ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}})
    assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None and len(later) == 1
    await later.look_once()
    assert len(later) == 0 and "the entries of d-ambiguous say what its client received already" in caplog.text
    entries = store.entries_for("d-ambiguous")
    assert [e.kind for e in entries] == ["request", "failed", "delivered"] and entries[-1].seq == lost[0]
    assert len(lost) == 1


async def test_a_wait_ends_at_its_horizon_at_the_bound_and_at_the_stop_each_logged(parts, caplog):
    store, runner = parts
    caplog.set_level(logging.WARNING, logger="gateway.requests.delivered")
    short = DeliveredLater(interval_s=3600, horizon_s=0, most=2)
    runner = SimpleNamespace(**{**vars(runner), "delivered_later": short})
    for n in range(3):
        await record_delivered(runner, ticket_for(f"d-bound-{n}"), HoldBack(8), SENT)
    assert len(short) == 2 and "what the client of d-bound-2 received is not recorded: 2 such" in caplog.text
    await short.look_once()  # no end came within its horizon (0 s)
    assert len(short) == 0 and "what the client of d-bound-0 received is not recorded: gave up" in caplog.text
    stopping = DeliveredLater(interval_s=0.01, horizon_s=3600)
    runner = SimpleNamespace(**{**vars(runner), "delivered_later": stopping})
    await record_delivered(runner, ticket_for("d-stop"), HoldBack(8), SENT)
    await asyncio.sleep(0.05)  # its task looked a few times: still no end
    assert len(stopping) == 1
    await stopping.aclose()
    assert len(stopping) == 0 and "the gateway stopped before their ends were in the audit log (d-stop)" in caplog.text
    assert SENT not in caplog.text


async def test_the_stop_looks_once_more_and_completes_an_end_recorded_after_the_cut(parts, caplog):
    """An unchecked stream cut by the gateway's stop: its worker records ``cancelled`` a moment after the cut
    (at its next token), after the stream's first look; the stop's last look finds it and appends the entry."""
    store, runner = parts
    caplog.set_level(logging.INFO, logger="gateway.requests.delivered")
    later: DeliveredLater = runner.delivered_later
    ticket = ticket_for("d-cut", check_output=False)
    requested(store, ticket)
    assert await record_delivered(runner, ticket, None, SENT) is None and len(later) == 1  # no end yet
    end = end_of(store, ticket, "cancelled", {"error": {"code": "cancelled"}}, {"output": SENT + " and more"})
    await later.aclose()
    entries = store.entries_for("d-cut")
    assert [e.kind for e in entries] == ["request", "cancelled", "delivered"] and len(later) == 0
    assert entries[-1].body["terminal_seq"] == end.seq and entries[-1].payload["client_output"] == SENT
    assert "is recorded now" in caplog.text and "not recorded" not in caplog.text


async def test_the_stop_s_last_look_is_bounded(parts, caplog, monkeypatch):
    store, runner = parts
    caplog.set_level(logging.WARNING, logger="gateway.requests.delivered")
    monkeypatch.setattr("gateway.requests.delivered.LAST_LOOK_S", 0.2)
    later: DeliveredLater = runner.delivered_later

    async def hangs() -> None:  # a database that never answers
        await asyncio.sleep(3600)

    later.keep("d-hung", hangs)
    started = time.monotonic()
    await later.aclose()
    assert time.monotonic() - started < 5 and len(later) == 0
    assert "took longer than 0.2s" in caplog.text and "(d-hung)" in caplog.text


@pytest.mark.parametrize("unchecked", ["rules off", "revision without a rule"])
async def test_an_unchecked_stream_s_end_gets_what_its_client_received_with_nothing_judged(parts, unchecked):
    """No output rules (``GOVGATE_OUTPUT_RULES`` off: no rules at all; or a revision without an output rule:
    no hold): the worker's end keeps what it sent as ``output``, give or take what was in transit; the
    gateway's entry says what the client got, with no ``output_decision`` (nothing was judged)."""
    store, runner = parts
    ticket = ticket_for(f"d-unchecked-{unchecked[0]}", check_output=False)
    end = ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}},
                {"output": SENT + " and what was in transit"})
    runner = replace_rules(runner) if unchecked == "rules off" else runner
    written = await record_delivered(runner, ticket, None, SENT)
    assert written is not None and [e.kind for e in store.entries_for(ticket.request_id)] == \
        ["request", "failed", "delivered"]
    assert written.body["terminal_seq"] == end.seq and written.body["ended_as"] == "failed"
    assert "output_decision" not in written.body and written.payload["client_output"] == SENT
    assert await record_delivered(runner, ticket, None, SENT) is None  # said now: the end is not completed twice
    assert [e.kind for e in store.entries_for(ticket.request_id)] == ["request", "failed", "delivered"]
    assert await record_delivered(runner, ticket, None, SENT + " more") is not None  # unless it says otherwise


async def test_an_unchecked_stream_s_redacted_entry_masks_the_policy_s_findings(parts):
    store, runner = parts
    secret = "4111 1111 1111 1111"
    ticket = ticket_for("d-unchecked-masked", prompt_logging="redacted", check_output=False,
                        redact=[{"detector": "card", "text": secret}])
    ended(store, ticket, "failed", {"error": {"code": "worker_lost"}})
    written = await record_delivered(replace_rules(runner), ticket, None, f"card {secret} sent")
    assert written is not None and secret not in str(written.to_document())
    assert written.payload["client_output"].startswith("card ") and written.body.get("client_output_masked") is True


def replace_rules(runner: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(runner), "output_rules": None})
