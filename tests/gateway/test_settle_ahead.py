"""A handed-over output's usage is settled while its output is judged and recorded (real Redis, SQLite).

The gateway waits for a non-streamed completion under the output rules,
the test plays its worker (the job queued on a Redis of the test's own, the
output handed over as ``workers/generation.py`` hands it over), and the
output rules are a stand-in that looks at the counters as it judges. The
settlement used to wait for the terminal entry's append, one Redis round
trip after it on every such request's path; the tokens are known from the
report, and every way the request ends charges them, so it now runs
alongside: the judgement sees the reservation already settled, and a
terminal entry the database refuses still leaves the generation charged.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import text

from audit import AuditStore
from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.components import open_database
from gateway.dispatch import Dispatcher, ResultWaiter
from gateway.limits import UsageCounters
from gateway.requests.holdback import HoldBack
from gateway.requests.outcome import TicketRunner
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.jobs import GenerateJob
from workers.contract.output_check import OutputReport, OutputVerdict
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.contract.terminal_body import Generated, checked_ending, generation_body
from workers.streams import RedisJobChannel

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))
DIGESTER = Digester(os.urandom(32))
NO_LIMITS = {"principal": {}, "team": None}
#: How long the stand-in rules wait for the settlement before they judge without it.
SETTLE_WAIT_S = 10.0


class _Rules:
    """The output rules as a handed-over output meets them; each judgement notes the principal's in-flight count."""

    def __init__(self, counters: UsageCounters) -> None:
        self.counters = counters
        self.in_flight_when_judged: list[int] = []

    def hold(self) -> HoldBack:
        return HoldBack(64)

    async def rule_absent(self, ticket: Ticket) -> bool:
        return False

    async def verdict_on(self, ticket: Ticket, hold: HoldBack, report: OutputReport, *,
                         abandoned: bool = False) -> OutputVerdict:
        deadline = time.monotonic() + SETTLE_WAIT_S
        while True:  # the settlement, when it runs alongside, is one round trip away
            in_flight = (await self.counters.snapshot(ticket.principal.id, ticket.principal.team))["principal"][
                "in_flight"]
            if in_flight == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self.in_flight_when_judged.append(in_flight)
        return OutputVerdict.unruled(report.text, "rev")


@pytest.fixture
async def parts(own_redis, tmp_path):  # noqa: F811
    engine = open_database(own_redis.with_(database_url=f"sqlite:///{tmp_path / 'settle.db'}"))
    client = aioredis.Redis.from_url(own_redis.redis_url)
    worker = redis.Redis.from_url(own_redis.redis_url)
    waiter = ResultWaiter(client, SEALER)
    await waiter.start()
    counters = UsageCounters(client)
    store = AuditStore(engine)
    pending = PendingTerminals(worker, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    request_log = RequestLog(store, current_revision=lambda: "rev", digester=DIGESTER, pending=pending)
    rules = _Rules(counters)
    runner = TicketRunner(dispatcher=Dispatcher(client, expires_s=30, sealer=SEALER, mode="fifo"), waiter=waiter,
                          redis=client, counters=counters, request_log=request_log, digester=DIGESTER,
                          request_timeout_s=20, output_rules=rules)
    try:
        yield SimpleNamespace(runner=runner, waiter=waiter, worker=worker, counters=counters, store=store,
                              pending=pending, rules=rules)
    finally:
        await runner.aclose()
        await request_log.aclose()
        await waiter.aclose()
        await client.aclose()
        worker.close()
        engine.dispose()


async def admitted(parts, principal: str) -> Ticket:
    """A ticket as admission leaves it: its request entry written, its tokens reserved."""
    request_id = uuid.uuid4().hex
    reservation = await parts.counters.reserve(request_id, principal, "ops", NO_LIMITS, 40)
    job = GenerateJob(request_id=request_id, model="tiny", endpoint="completions", params=SamplingParams(8),
                      principal=principal, team="ops", policy_revision="rev", prompt="Once", check_output=True,
                      gateway_records=True)
    parts.store.append("request", request_id, principal=principal, team="ops", model="tiny", body={},
                       policy_revision="rev")
    return Ticket(request_id=request_id, principal=Principal(principal, "ops", ("analyst",), "k1"), model="tiny",
                  created=int(time.time()), job=job, reservation=reservation)


def hand_over(parts, ticket: Ticket) -> None:
    """What a worker does with a finished non-streamed output under the output rules: 3 prompt + 5 output tokens."""
    job = ticket.job
    generated = Generated("the output", 3, 5, "length", {"hostname": "w", "pid": 1}, 2.0, 9.0,
                          ended_ns=time.time_ns())
    fallback = checked_ending(job, None, generated.finish_reason, DIGESTER)
    body = generation_body(job, generated, DIGESTER, finish_reason=fallback.finish_reason, error=fallback.error)
    handed_over = generated.to_payload()
    entry = PendingTerminal(kind=fallback.kind, request_id=job.request_id, principal=job.principal, team=job.team,
                            model=job.model, body=body, policy_revision=job.policy_revision,
                            not_before=time.time() + 60, report={"output": generated.output,
                                                                 "handed_over": handed_over})
    channel = RedisJobChannel(parts.worker, job.request_id, streaming=False, sealer=SEALER,
                              reply_to=parts.waiter.reply_channel)
    assert channel.hand_over(OutputReport(generated.output, handed_over=handed_over), parts.pending.sealed(entry))


async def completed(parts, ticket: Ticket):
    """Run ``ticket`` to its end, handing its output over once its job is queued."""
    running = asyncio.ensure_future(parts.runner.complete(ticket))
    deadline = time.monotonic() + 10
    while not parts.worker.keys("*tiny*"):  # queued (the job's list, or its priority's)
        assert time.monotonic() < deadline, "the job was never queued"
        await asyncio.sleep(0.01)
    hand_over(parts, ticket)
    return await running


async def charged(parts, principal: str) -> dict:
    return (await parts.counters.snapshot(principal, "ops"))["principal"]


async def test_the_usage_is_settled_while_the_handed_over_output_is_judged(parts):
    ticket = await admitted(parts, "ann")
    assert (await charged(parts, "ann"))["in_flight"] == 1
    result = await completed(parts, ticket)
    assert (result.status, result.text, result.prompt_tokens + result.completion_tokens) == ("completed",
                                                                                             "the output", 8)
    assert parts.rules.in_flight_when_judged == [0]  # settled before the judgement ended, not after the append
    assert [e.kind for e in parts.store.entries_for(ticket.request_id)] == ["request", "completion"]
    usage = await charged(parts, "ann")
    assert usage["in_flight"] == 0 and usage["tokens_today"] == 8  # charged once, what was generated
    assert not parts.runner.settlements.ahead


async def test_a_handed_over_output_whose_entry_the_database_refuses_is_charged_what_it_generated(parts):
    ticket = await admitted(parts, "bob")
    with parts.store.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON audit_entries "
                          "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
    with pytest.raises(ApiError) as refused:
        await completed(parts, ticket)
    assert (refused.value.status, refused.value.code) == (503, "audit_unavailable")
    assert parts.pending.holds(ticket.request_id)  # kept, to be written when the database is back
    usage = await charged(parts, "bob")
    assert usage["in_flight"] == 0 and usage["tokens_today"] == 8  # the model ran: its tokens count
    assert not parts.runner.settlements.ahead
