"""Requests ended while their gateway was gone are settled by a gateway of this layout, whoever else pops.

Since 2026-12-02 a request's usage record is a field of the principal's
counters hash. A gateway from before then looks for it in a key of its own,
finds none and drops the name as settled already; in a rolling upgrade it
popped, from the one list, the names of a newer gateway's requests (seen with
an old and a new gateway on one Redis, the new one killed with requests
queued: their in-flight slots stayed taken, their reservations charged).
Real Redis and a real SQLite audit store; the older gateway's sweep is its
one ``LPOP``, done by hand.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from audit import AuditStore
from gateway.limits import UsageCounters
from gateway.requests.unsettled import settle_unsettled
from govgate.redis_server import RedisProcess
from tests.conftest_models import store  # noqa: F401 - fixture (a fresh migrated SQLite store)
from workers.contract.unsettled import UNSETTLED_KEY, note_unsettled

pytestmark = pytest.mark.anyio

EVERYTHING = {"principal": {}, "team": {}}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="gg-unsettled-"))
    server = RedisProcess.start(folder, persist=False)
    yield server.url
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.flushall()
    await client.aclose()


async def ended_unheard(store: AuditStore, counters: UsageCounters, principal: str) -> str:  # noqa: F811
    """A request reserved (40 tokens), then ended by its worker having used 7 while no gateway listened."""
    request_id = uuid.uuid4().hex
    await counters.reserve(request_id, principal, "research", EVERYTHING, 40)
    store.append("request", request_id, principal=principal, team="research", model="tiny", body={},
                 policy_revision="rev-1")
    store.append("completion", request_id, principal=principal, team="research", model="tiny",
                 body={"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, policy_revision="rev-1")
    return request_id


async def test_a_name_an_older_gateway_popped_is_still_settled(store, aclient, redis_url):  # noqa: F811
    counters = UsageCounters(aclient)
    principal = f"p-{uuid.uuid4().hex[:8]}"
    request_id = await ended_unheard(store, counters, principal)
    with redis.Redis.from_url(redis_url) as client:
        note_unsettled(client, request_id)
        assert client.lpop(UNSETTLED_KEY, 100) == [request_id.encode()]  # an older gateway's sweep: dropped
    assert (await counters.snapshot(principal, "research"))["principal"]["in_flight"] == 1
    await settle_unsettled(aclient, counters, store)
    usage = (await counters.snapshot(principal, "research"))["principal"]
    assert (usage["in_flight"], usage["tokens_today"]) == (0, 7)


async def test_names_on_both_lists_or_from_an_older_worker_are_settled_once(store, aclient, redis_url):  # noqa: F811
    counters = UsageCounters(aclient)
    principal = f"p-{uuid.uuid4().hex[:8]}"
    both, older = await ended_unheard(store, counters, principal), await ended_unheard(store, counters, principal)
    with redis.Redis.from_url(redis_url) as client:
        note_unsettled(client, both)
        client.lpush(UNSETTLED_KEY, older)  # an older worker names it on the one list it knows
    assert await settle_unsettled(aclient, counters, store) == 2  # the most taken from one list
    usage = (await counters.snapshot(principal, "research"))["principal"]
    assert (usage["in_flight"], usage["tokens_today"]) == (0, 14)
    assert await settle_unsettled(aclient, counters, store) == 0
