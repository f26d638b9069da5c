"""A checked stream's ``delivered`` entry (``gateway/requests/delivered.py``): written only when its end cannot say.

Real parts: a SQLite audit store of the test's own, written through the gateway's
:class:`RequestLog` (its append thread). The runner is a stand-in holding the three
parts :func:`record_delivered` reads (output rules, request log, digester); the served
path (Redis dying mid-stream) is in ``tests/e2e/test_stream_faults.py``.
"""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from audit import AuditStore, make_engine, migrate
from gateway.auth import Principal
from gateway.requests.delivered import record_delivered, says_what_was_delivered
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
    runner = SimpleNamespace(output_rules=rules, request_log=request_log, digester=DIGESTER)
    yield store, runner
    await request_log.aclose()
    store.engine.dispose()


def ticket_for(request_id: str, prompt_logging: str = "full") -> Ticket:
    job = GenerateJob(request_id=request_id, model="tiny", endpoint="completions", params=SamplingParams(64),
                      principal="ann", team="ops", policy_revision="rev", prompt="Once", check_output=True,
                      stream=True, prompt_logging=prompt_logging)
    return Ticket(request_id=request_id, principal=Principal("ann", "ops", ("analyst",), "k1"), model="tiny",
                  created=int(time.time()), job=job)


def ended(store: AuditStore, ticket: Ticket, kind: str, body: dict, payload: dict | None = None):
    store.append("request", ticket.request_id, principal="ann", team="ops", model="tiny", body={},
                 policy_revision="rev")
    return store.append(kind, ticket.request_id, principal="ann", team="ops", model="tiny", body=body,
                        policy_revision="rev", payload=payload)


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
    for n, (body, payload) in enumerate([({"error": {"code": "cancelled"}}, {"client_output": SENT}),
                                         ({"client_output_chars": 19, "client_output_hmac_sha256": "ab"}, None)]):
        ticket = ticket_for(f"d-said-{n}")
        end = ended(store, ticket, "cancelled", body, payload)
        assert says_what_was_delivered(end)
        assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None
        assert [entry.kind for entry in store.entries_for(ticket.request_id)] == ["request", "cancelled"]


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


async def test_no_end_yet_or_a_refusing_database_is_logged_not_raised(parts, caplog):
    store, runner = parts
    caplog.set_level(logging.WARNING, logger="gateway.requests.delivered")
    assert await record_delivered(runner, ticket_for("d-none"), HoldBack(8), SENT) is None
    assert "is not recorded: its end is not in the audit log" in caplog.text
    ticket = ticket_for("d-refused")
    ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}})
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
    assert await record_delivered(runner, ticket, HoldBack(8), SENT) is None
    assert "could not record what the client of d-refused received" in caplog.text
    assert SENT not in caplog.text
    assert [entry.kind for entry in store.entries_for("d-refused")] == ["request", "failed"]


async def test_no_output_rules_means_nothing_to_record(parts):
    store, runner = parts
    ticket = ticket_for("d-unruled")
    ended(store, ticket, "failed", {"error": {"code": "worker_error", "message": "Redis"}})
    assert await record_delivered(replace_rules(runner), ticket, HoldBack(8), SENT) is None
    assert [entry.kind for entry in store.entries_for("d-unruled")] == ["request", "failed"]


def replace_rules(runner: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(runner), "output_rules": None})
