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

import pytest
import redis
from sqlalchemy import text

from audit import AuditStore, DuplicateTerminalError
from gateway.auth import Principal
from gateway.components import open_database
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.jobs import GenerateJob
from workers.contract.output_check import OutputVerdict
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.contract.terminal_body import Generated, checked_ending, generation_body

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))
DIGESTER = Digester(os.urandom(32))


@pytest.fixture
def parts(own_redis, tmp_path):
    engine = open_database(own_redis.with_(database_url=f"sqlite:///{tmp_path / 'handed.db'}"))
    client = redis.Redis.from_url(own_redis.redis_url)
    pending = PendingTerminals(client, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    store = AuditStore(engine)
    yield store, client, pending, RequestLog(store, current_revision=lambda: "rev", digester=DIGESTER,
                                             pending=pending)
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
