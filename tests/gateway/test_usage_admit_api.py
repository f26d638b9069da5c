"""The early reservation through the HTTP API: kept when the decision obliges what it guessed,
replaced when it grants other terms, undone when the request is denied.

Runs the real gateway in-process on a copy of the shipped policy (a principal
of its own with a request limit), the real Redis counters and a real worker,
and reads what each decision judged from the audit log's policy input.
"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.limits import UsageCounters
from tests.conftest import bearer, policy_copy
from tests.keys_and_limits import limits_for, new_key
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


async def test_denied_and_regranted_requests_leave_exact_counters(settings, worker, tmp_path, audit_store):
    name, team = f"early-{uuid.uuid4().hex[:8]}", f"crew-{uuid.uuid4().hex[:8]}"
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", name, requests_per_minute=3)))
    key = new_key(own, name, team)

    async def ask(content: str, max_tokens: int) -> tuple[int, dict]:
        response = await client.post("/v1/chat/completions", headers=bearer(key),
                                     json={"model": TINY_MODEL_NAME, "max_tokens": max_tokens,
                                           "messages": [{"role": "user", "content": content}]})
        entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
        return response.status_code, entry.body

    async with AsyncTestClient(create_app(own), timeout=60) as client:
        first = await ask("Hello", 2)  # no guess yet: snapshot, then reserve
        denied = await ask("Card 4111 1111 1111 1111 please", 2)  # reserved early, then undone
        regranted = await ask("Hello", 300)  # clamped to the analyst's 256: other tokens, replaced in one call
        kept = await ask("Hello", 3)  # the guess holds: the snapshot's call is the reservation
        over = await ask("Hello", 3)  # the fourth request in a minute: refused by the early check
    assert [s for s, _ in (first, denied, regranted, kept, over)] == [200, 403, 200, 200, 429]
    judged = [body["policy_input"]["usage"]["principal"]["requests_last_minute"]
              for _, body in (first, denied, regranted, kept, over)]
    assert judged == [0, 1, 1, 2, 3]  # the denied request was never counted
    assert [body["admission"]["reserved_tokens"] - body["admission"]["prompt_tokens"]
            for _, body in (first, regranted, kept)] == [2, 256, 3]
    client_redis = aioredis.Redis.from_url(own.redis_url)
    try:
        usage = await UsageCounters(client_redis).snapshot(name, team)
    finally:
        await client_redis.aclose()
    assert (usage["principal"]["requests_last_minute"], usage["principal"]["in_flight"]) == (3, 0)
    assert usage["team"]["requests_last_minute"] == 3
