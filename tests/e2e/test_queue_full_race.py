"""A full queue under a race, on a served gateway: every racer is refused queue_full and holds nothing.

The queue depth is read and the reservation made in one script
(docs/architecture.md, "Usage counters"), so a request refused for a full
queue never holds tokens or an in-flight slot, not even for a moment, and
concurrent requests are told the queue is full, not that someone else's
passing reservation is in flight. Runs ``govgate serve`` on a Redis of its
own so that the counters read at the end hold only this test's requests.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from tests.conftest import QUEUE_MODEL, bearer, serving
from tests.gateway.test_fail_closed import queued
from tests.own_redis import own_redis  # noqa: F401  (fixture)

HELLO = [{"role": "user", "content": "Hello"}]
RACERS = 12


def test_racers_for_a_full_queue_are_refused_and_hold_nothing(own_redis, keyring, audit_store,  # noqa: F811
                                                               tmp_path) -> None:
    # fifo: the total check. The two queued requests must still wait while the racers are refused (about half
    # a second under a CPU burner); the test then waits their timeout out.
    own = own_redis.with_(max_queued_per_model=2, request_timeout_s=3, queue_mode="fifo")
    statuses: list[int] = []

    def post() -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", headers=bearer(keyring["admin"]),
                          json={"model": QUEUE_MODEL, "messages": HELLO}, timeout=60)

    with serving(own, tmp_path / "serve.log") as base:
        waiting = [threading.Thread(target=lambda: statuses.append(post().status_code)) for _ in range(2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while queued(own, QUEUE_MODEL) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused: list[httpx.Response] = []
        racers = [threading.Thread(target=lambda: refused.append(post())) for _ in range(RACERS)]
        for thread in racers:
            thread.start()
        for thread in racers:
            thread.join(30)
        usage = asyncio.run(_usage(own.redis_url))
        for thread in waiting:
            thread.join(30)
    assert len(refused) == RACERS
    assert {(r.status_code, r.json()["error"]["code"], r.headers.get("retry-after")) for r in refused} \
        == {(429, "queue_full", "1")}
    # the two queued requests hold their reservations; the refused ones never held any
    assert (usage["in_flight"], usage["requests_last_minute"]) == (2, 2)
    entries = [e for e in audit_store.tail(40) if (e.body.get("admission") or {}).get("code") == "queue_full"]
    assert len({e.request_id for e in entries}) >= RACERS
    assert {(e.body["admission"]["waiting"], e.body["admission"]["limit"]) for e in entries[-RACERS:]} == {(2, 2)}
    assert sorted(statuses) == [504, 504]


async def _usage(redis_url: str) -> dict:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return (await UsageCounters(client).snapshot("root", "ops"))["principal"]
    finally:
        await client.aclose()


def test_racers_for_an_empty_fifo_queue_take_exactly_its_places(own_redis, keyring, audit_store,  # noqa: F811
                                                                tmp_path) -> None:
    """h8 finding 2, fifo's side: requests sent at one instant all read an empty queue, and before an admitted
    request held its place until queued, every admission between its reservation and its push passed the
    check. Now exactly the limit's worth is admitted (they wait their timeout: no worker serves the model)."""
    own = own_redis.with_(max_queued_per_model=2, request_timeout_s=15, queue_mode="fifo")
    answers: list[httpx.Response] = []
    start = threading.Barrier(RACERS)

    def post() -> None:
        start.wait(30)
        answers.append(httpx.post(f"{base}/v1/chat/completions", headers=bearer(keyring["admin"]),
                                  json={"model": QUEUE_MODEL, "messages": HELLO}, timeout=90))

    with serving(own, tmp_path / "serve.log") as base:
        racers = [threading.Thread(target=post) for _ in range(RACERS)]
        for thread in racers:
            thread.start()
        deadline = time.monotonic() + 60
        # the refusals come first; the two admitted wait in the queue until their timeout
        while sum(1 for r in answers if r.status_code == 429) < RACERS - 2 and len(answers) < RACERS:
            assert time.monotonic() < deadline, sorted(r.status_code for r in answers)
            time.sleep(0.05)
        depth = queued(own, QUEUE_MODEL)
        for thread in racers:
            thread.join(120)
    assert depth == 2
    assert sorted(r.status_code for r in answers) == [429] * (RACERS - 2) + [504, 504]
