"""A request the policy refuses never takes a queue place from one the policy allows (probe p2 #1).

A key whose last request was allowed reserves early, with the snapshot the
policy reads, before the decision (gateway/requests/admission.py). Until
2026-12-05 that early reservation also took the request's place in the
model's queue (``govgate:admitting:<model>``), so a flood of requests the
policy then denied held places for the time of their decisions, and another
team's valid request was refused 429 ``queue_full`` at a small
``GOVGATE_MAX_QUEUED_PER_MODEL``. Now an early reservation takes no place;
the push checks the queue again and takes it in the same step, refusing
``queue_full`` there when the queue filled meanwhile.

The real app in-process, the real Redis, scripts and worker; each decision
of the heavy key is held open (the policy engine's call waits on an event)
so the early reservation is certainly standing while the other team asks.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.limits import UsageCounters
from gateway.limits.admitting import admitting_key
from tests.conftest import bearer
from tests.keys_and_limits import new_key
from workers.contract.registry import TINY_MODEL_NAME

CARD = "my card is 4111 1111 1111 1111"  # the shipped policy denies it (blocked_content)


def _body(content: str = "Hello") -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}


class HeldDecisions:
    """Holds the policy's decisions of the inputs ``which`` picks until :meth:`release`; counts them."""

    def __init__(self, admission, which: Callable[[dict[str, Any]], bool]) -> None:
        self.which = which
        self.gate = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()
        original = admission.policy.decide_with_revision

        async def decide_with_revision(policy_input: dict[str, Any]):
            if self.which(policy_input):
                with self._lock:
                    self.waiting += 1
                await anyio.to_thread.run_sync(self.gate.wait, 60)
            return await original(policy_input)

        admission.policy.decide_with_revision = decide_with_revision

    def until_waiting(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.waiting < n:
            assert time.monotonic() < deadline, f"{self.waiting} of {n} decisions held"
            time.sleep(0.02)

    def release(self) -> None:
        self.gate.set()


def _of(principal: str) -> Callable[[dict[str, Any]], bool]:
    return lambda policy_input: policy_input["principal"]["id"] == principal


@pytest.mark.parametrize("mode", ["fifo", "fair"])
def test_a_request_being_denied_holds_no_place_from_an_allowed_one(settings, worker, mode) -> None:
    """A limit of 1. fifo: the held denial filled the model's queue, and another team's request was refused.
    Fair: it filled its own team's one place, and a teammate's request was refused (another team's first
    request is admitted whatever its share, below the ceiling)."""
    tag = uuid.uuid4().hex[:6]
    own = settings.with_(queue_mode=mode, max_queued_per_model=1)
    heavy, light = f"heavy-{tag}", f"light-{tag}"
    heavy_key = new_key(own, heavy, f"hv-{tag}")
    light_key = new_key(own, light, f"hv-{tag}" if mode == "fair" else f"lt-{tag}")
    with TestClient(create_app(own), timeout=120) as client:
        def post(key: str, content: str = "Hello"):
            return client.post("/v1/chat/completions", headers=bearer(key), json=_body(content))

        primed = post(heavy_key)  # allowed: the heavy key's next requests reserve early
        assert primed.status_code == 200, primed.text
        decisions = HeldDecisions(client.app.state.components.completions.admission,
                                  lambda i: i["principal"]["id"] == heavy and CARD in json.dumps(i))
        with ThreadPoolExecutor(1) as pool:
            denied = pool.submit(post, heavy_key, CARD)
            try:
                decisions.until_waiting(1)  # its early reservation stands, its decision waits
                allowed = post(light_key)
            finally:
                decisions.release()
            refused = denied.result(120)
    assert allowed.status_code == 200, allowed.text
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "policy_denied"), refused.text


@pytest.mark.parametrize("stream", [False, True])
def test_an_early_reservation_finding_the_queue_full_at_its_push_is_refused_and_holds_nothing(
        settings, worker, audit_store, stream) -> None:
    """The other side: the early reservation took no place, so the push checks the queue and takes it in one
    step; a queue that filled while the policy decided refuses the request there (429 ``queue_full``), its
    reservation is undone and its entry ends ``failed``."""
    tag = uuid.uuid4().hex[:6]
    own = settings.with_(queue_mode="fifo", max_queued_per_model=1)
    name, team = f"late-{tag}", f"lt-{tag}"
    key = new_key(own, name, team)
    raw = redis.Redis.from_url(own.redis_url)
    place = f"other-{tag}"
    try:
        with TestClient(create_app(own), timeout=120) as client:
            def post():
                return client.post("/v1/chat/completions", headers=bearer(key), json={**_body(), "stream": stream})

            assert post().status_code == 200  # the next one reserves early
            decisions = HeldDecisions(client.app.state.components.completions.admission, _of(name))
            with ThreadPoolExecutor(1) as pool:
                late = pool.submit(post)
                try:
                    decisions.until_waiting(1)
                    # meanwhile another request was admitted and holds the queue's one place
                    expiry = int((time.time() + 60) * 1e6)
                    raw.hset(admitting_key(TINY_MODEL_NAME), place, f" {expiry}")  # fifo: no team field
                finally:
                    decisions.release()
                answer = late.result(120)
            usage = anyio.run(_usage, own.redis_url, name, team)
    finally:
        raw.hdel(admitting_key(TINY_MODEL_NAME), place)
        raw.close()
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "queue_full"
    assert "1 requests are already waiting for this model (limit 1)" in answer.json()["error"]["message"]
    assert answer.headers["retry-after"] == "1"
    request_id = answer.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed"]
    assert entries[1].body["error"]["code"] == "queue_full"
    # undone: as a request refused queue_full at its admission, it holds nothing and never entered the minute
    assert (usage["in_flight"], usage["requests_last_minute"]) == (0, 1)


async def _usage(url: str, principal: str, team: str) -> dict:
    client = aioredis.Redis.from_url(url)
    try:
        return (await UsageCounters(client).snapshot(principal, team))["principal"]
    finally:
        await client.aclose()
