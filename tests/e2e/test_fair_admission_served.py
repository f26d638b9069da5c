"""Fair-share admission on a served gateway: a team at its cap is refused 429 ``queue_full`` naming its share,
with a Retry-After that grows with its backlog, while another team is still admitted.

``govgate serve`` in fair mode on a Redis of its own, with team shares in the
policy's data (the gateway publishes them). The model's waiting counts are
seeded as the queue core keeps them, so the refusal does not depend on how
many jobs this test can make wait; no worker serves the model, so an
admitted request waits and ends 504 at the request timeout.
"""

from __future__ import annotations

import time
import uuid

import httpx
import redis

from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.limits.fair_share import team_field
from tests.conftest import IDLE_MODEL, bearer, policy_copy, serving
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.fair_queues import SHARES_KEY, tags_key, waiting_key

HELLO = [{"role": "user", "content": "Hello"}]


def _teams(config: dict) -> None:
    config["teams"]["fair-a"] = {"share": 1}
    config["teams"]["fair-b"] = {"share": 1}
    config["roles"]["analyst"]["models"].append(IDLE_MODEL)
    roomy = {"requests_per_minute": 100000, "tokens_per_minute": 10**9, "tokens_per_day": 10**10,
             "tokens_per_month": None, "in_flight": 1000}
    config["limits"] = {"principals": {"default": roomy}, "teams": {"default": roomy}}


def test_a_team_at_its_cap_gets_429_naming_its_share_and_another_team_is_admitted(
        own_redis, audit_store, tmp_path) -> None:  # noqa: F811
    own = own_redis.with_(queue_mode="fair", max_queued_per_model=64, request_timeout_s=3,
                          policy_dir=policy_copy(tmp_path, _teams))
    store = KeyStore(open_database(own))
    suffix = uuid.uuid4().hex[:6]
    key_a = store.create(f"ann-{suffix}", team="fair-a", roles=["analyst"]).secret
    key_b = store.create(f"bob-{suffix}", team="fair-b", roles=["analyst"]).secret
    store.engine.dispose()
    raw = redis.Redis.from_url(own.redis_url)

    def post(key: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", headers=bearer(key),
                          json={"model": IDLE_MODEL, "messages": HELLO, "max_tokens": 1}, timeout=60)

    def seed(a_waiting: int) -> None:
        raw.hset(waiting_key(IDLE_MODEL), mapping={team_field("fair-a"): a_waiting, team_field("fair-b"): 1})

    try:
        raw.hset(tags_key(IDLE_MODEL), "svc", "500")
        with serving(own, tmp_path / "serve.log") as base:
            deadline = time.monotonic() + 15
            while raw.hget(SHARES_KEY, "fair-a") != b"1":  # published by the gateway from the policy
                assert time.monotonic() < deadline, "the gateway did not publish the shares"
                time.sleep(0.05)
            seed(32)
            refused = post(key_a)
            admitted = post(key_b)
            seed(40)
            refused_more = post(key_a)
    finally:
        raw.close()

    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and error["param"] is None
    assert [r["code"] for r in error["reasons"]] == ["queue_full"]
    assert f"model '{IDLE_MODEL}' queue, team fair-a: 32 waiting, 32 places (its share, 50 % of 64)" in error["message"]
    # one place to free at half of one (assumed) worker of 500 ms a job: 1 s; nine places: 9 s
    assert refused.headers["retry-after"] == "1"
    assert refused_more.status_code == 429 and refused_more.headers["retry-after"] == "9"
    assert "40 waiting, 32 places" in refused_more.json()["error"]["message"]
    assert admitted.status_code == 504, admitted.text  # admitted, queued, never served (no worker)

    request_id = refused.headers["x-govgate-request-id"]
    entry = audit_store.entries_for(request_id)[0]
    admission = entry.body["admission"]
    assert admission["code"] == "queue_full" and admission["team"]["name"] == "fair-a"
    assert (admission["team"]["cap"], admission["team"]["share"], admission["team"]["retry_after_s"]) == (32, 0.5, 1)
    assert audit_store.terminal_for(request_id) is None  # refused before anything was queued
