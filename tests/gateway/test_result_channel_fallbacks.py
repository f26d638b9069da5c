"""The reply channel's reconnect finds the fallbacks of handed-over outputs whose report it lost (real Redis).

A worker that hands a non-streamed output over keeps its fallback in the
pending terminals and publishes the report (``workers/streams.py``,
``RedisJobChannel.hand_over``, used here as the worker uses it). The report
is not stored: a reconnecting gateway looks up the fallbacks of its
waiting handed-over requests and gives each one that heard no report its
fallback (``gateway.dispatch.results.FoundFallback``). The served path, a
request answered from it, is in ``tests/e2e/test_lost_report.py``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from gateway.dispatch import ResultWaiter
from gateway.dispatch.results import FoundFallback
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.output_check import OutputReport
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.sealing import Sealer
from workers.streams import RedisJobChannel

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))
#: A reply channel nobody listens on: a report published there is lost, as when the connection was down.
NOBODY = "govgate:gateway:nobody"


@pytest.fixture
async def waiter(own_redis):
    client = aioredis.Redis.from_url(own_redis.redis_url)
    waiter = ResultWaiter(client, SEALER)
    await waiter.start()
    try:
        yield waiter
    finally:
        await waiter.aclose()
        await client.aclose()


@pytest.fixture
def worker_redis(own_redis):
    client = redis.Redis.from_url(own_redis.redis_url)
    try:
        yield client
    finally:
        client.close()


def fallback(request_id: str, *, not_before: float) -> PendingTerminal:
    body = {"output": "what the model said", "usage": {"prompt_tokens": 2, "completion_tokens": 3},
            "error": {"code": "output_unchecked", "message": "no verdict"}}
    return PendingTerminal(kind="failed", request_id=request_id, principal="ann", team="ops", model="tiny",
                           body=body, policy_revision="rev", not_before=not_before)


def hand_over(worker_redis, request_id: str, reply_to: str) -> None:
    """What the worker does: keep the fallback, publish the report (one pipeline)."""
    pending = PendingTerminals(worker_redis, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    channel = RedisJobChannel(worker_redis, request_id, streaming=False, sealer=SEALER, reply_to=reply_to)
    report = OutputReport("what the model said", handed_over={"prompt_tokens": 2})
    assert channel.hand_over(report, pending.sealed(fallback(request_id, not_before=time.time() + 60)))


async def next_event(pending, timeout_s: float = 10) -> Any:
    async for event in pending.events(timeout_s):
        return event


async def test_a_lost_report_is_replaced_by_its_fallback_after_the_reconnect(waiter, worker_redis):
    async with waiter.expect("fb-lost", checked=True, handed_over=True) as pending:
        hand_over(worker_redis, "fb-lost", NOBODY)
        assert pending.backlog() == 0
        assert worker_redis.client_kill_filter(_type="pubsub") >= 1
        event = await next_event(pending)
    assert isinstance(event, FoundFallback)
    assert event.entry["kind"] == "failed" and event.entry["request_id"] == "fb-lost"
    assert event.entry["body"]["output"] == "what the model said"
    assert worker_redis.hexists(PENDING_KEY, "fb-lost")  # the waiter only reads it; the request's end writes


async def test_only_requests_that_heard_no_report_get_their_fallback(waiter, worker_redis):
    pending_terminals = PendingTerminals(worker_redis, horizon_s=60, seal=SEALER.seal, unseal=SEALER.unseal)
    async with waiter.expect("fb-heard", checked=True, handed_over=True) as heard, \
            waiter.expect("fb-refused", checked=True, handed_over=True) as refused, \
            waiter.expect("fb-unchecked", checked=True) as unchecked, \
            waiter.expect("fb-lost-2", checked=True, handed_over=True) as lost:
        hand_over(worker_redis, "fb-heard", waiter.reply_channel)
        assert isinstance(await next_event(heard), OutputReport)  # heard and read before the loss
        # A worker's end the database refused (no not_before): its outcome is stored, it is no fallback.
        assert pending_terminals.keep(fallback("fb-refused", not_before=0.0))
        hand_over(worker_redis, "fb-unchecked", NOBODY)  # a wait that did not offer to record hand-overs
        hand_over(worker_redis, "fb-lost-2", NOBODY)
        assert worker_redis.client_kill_filter(_type="pubsub") >= 1
        assert isinstance(await next_event(lost), FoundFallback)
        # Delivered together with fb-lost-2's, or not at all.
        assert (heard.backlog(), refused.backlog(), unchecked.backlog()) == (0, 0, 0)
    # The waiter still hears reports after the reconnect.
    async with waiter.expect("fb-after", checked=True, handed_over=True) as after:
        hand_over(worker_redis, "fb-after", waiter.reply_channel)
        assert isinstance(await next_event(after), OutputReport)


async def test_a_fallback_sealed_under_another_key_is_left_alone(waiter, worker_redis):
    other = Sealer(os.urandom(32))
    pending = PendingTerminals(worker_redis, horizon_s=60, seal=other.seal, unseal=other.unseal)
    async with waiter.expect("fb-foreign", checked=True, handed_over=True) as foreign, \
            waiter.expect("fb-lost-3", checked=True, handed_over=True) as lost:
        assert pending.keep(fallback("fb-foreign", not_before=time.time() + 60))
        hand_over(worker_redis, "fb-lost-3", NOBODY)
        assert worker_redis.client_kill_filter(_type="pubsub") >= 1
        assert isinstance(await next_event(lost), FoundFallback)
        assert foreign.backlog() == 0
