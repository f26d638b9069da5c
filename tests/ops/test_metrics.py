"""``/metrics`` after known requests: counters move by exactly what was sent (the real app, worker, Redis)."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway import urls
from gateway.app import create_app
from govgate.redis_server import RedisProcess
from tests.conftest import IDLE_MODEL, bearer
from tests.ops.metrics_text import samples, value
from workers.contract.queue_layout import queue_keys
from workers.contract.fair_queues import waiting_key
from workers.contract.jobs import queue_for
from workers.contract.registry import TINY_MODEL_NAME

CHAT = urls.CHAT_COMPLETIONS
HELLO = [{"role": "user", "content": "Hello"}]

pytestmark = pytest.mark.anyio


async def scrape(client, key: str) -> dict:
    """A scrape with the per-model view (an admin key: tests/ops/test_operator_view.py checks the view without)."""
    response = await client.get(urls.METRICS, headers=bearer(key))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.text)


async def test_three_allowed_and_one_denied_move_the_counters_by_exactly_that(client, keyring, audit_store):
    before = await scrape(client, keyring["admin"])
    completion_tokens = prompt_tokens = 0
    for _ in range(3):
        response = await client.post(CHAT, headers=bearer(keyring["analyst"]),
                                     json={"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 8})
        assert response.status_code == 200, response.text
        completion_tokens += response.json()["usage"]["completion_tokens"]
        prompt_tokens += response.json()["usage"]["prompt_tokens"]
    denied = await client.post(CHAT, headers=bearer(keyring["viewer"]), json={"model": TINY_MODEL_NAME,
                                                                              "messages": HELLO})
    # viewers see no model: answered as an unknown one, counted below as the denial it was
    assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
    after = await scrape(client, keyring["admin"])

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"endpoint": CHAT, "model": TINY_MODEL_NAME, "status": "2xx", "code": ""}
    assert moved("govgate_requests_total", **ok) == 3
    assert moved("govgate_requests_total", **{**ok, "status": "4xx", "code": "policy_denied"}) == 1
    assert moved("govgate_request_duration_seconds_count", endpoint=CHAT) == 4
    assert moved("govgate_policy_decision_seconds_count") == 4
    assert moved("govgate_audit_append_seconds_count", kind="request") == 4
    assert moved("govgate_queue_wait_seconds_count", model=TINY_MODEL_NAME) == 3
    assert completion_tokens > 0
    assert moved("govgate_tokens_total", model=TINY_MODEL_NAME, kind="completion") == completion_tokens
    assert moved("govgate_tokens_total", model=TINY_MODEL_NAME, kind="prompt") == prompt_tokens
    assert value(after, "govgate_cluster_read_ok") == 1
    assert value(after, "govgate_workers", model=TINY_MODEL_NAME) >= 1
    assert value(after, "govgate_workers", model=IDLE_MODEL) == 0
    assert value(after, "process_cpu_seconds_total") > 0


async def test_queue_depth_is_read_from_redis(client, settings, keyring):
    """Jobs waiting in an unserved model's queue show in its gauge, across priorities."""
    import redis

    direct = redis.Redis.from_url(settings.redis_url)
    keys = queue_keys(queue_for(IDLE_MODEL))
    try:
        base = value(await scrape(client, keyring["admin"]), "govgate_queue_depth", model=IDLE_MODEL)
        direct.lpush(keys[0], "a", "b")
        direct.lpush(keys[5], "c")
        assert value(await scrape(client, keyring["admin"]), "govgate_queue_depth", model=IDLE_MODEL) == base + 3
        # fair mode's queues: the waiting count per team the pushes keep
        direct.hincrby(waiting_key(IDLE_MODEL), "metrics-team-a", 2)
        direct.hincrby(waiting_key(IDLE_MODEL), "metrics-team-b", 1)
        assert value(await scrape(client, keyring["admin"]), "govgate_queue_depth", model=IDLE_MODEL) == base + 6
    finally:
        for key in (keys[0], keys[5]):
            direct.lrem(key, 0, "a"), direct.lrem(key, 0, "b"), direct.lrem(key, 0, "c")
        direct.hdel(waiting_key(IDLE_MODEL), "metrics-team-a", "metrics-team-b")
        direct.close()


async def test_labels_never_hold_what_a_client_made_up(client, keyring):
    """An unknown path is counted as ``unmatched``, an unknown model with no model label."""
    before = await scrape(client, keyring["admin"])
    assert (await client.get("/no/such/path/x9q")).status_code == 404
    response = await client.post(CHAT, headers=bearer(keyring["analyst"]),
                                 json={"model": "made-up-model-x9q", "messages": HELLO})
    assert response.status_code == 404
    after = await client.get(urls.METRICS, headers=bearer(keyring["admin"]))
    assert "x9q" not in after.text
    parsed = samples(after.text)
    assert value(parsed, "govgate_requests_total", endpoint="unmatched", model="", status="4xx",
                 code="not_found") - value(before, "govgate_requests_total", endpoint="unmatched", model="",
                                           status="4xx", code="not_found") == 1
    assert value(parsed, "govgate_requests_total", endpoint=CHAT, model="", status="4xx", code="model_not_found") \
        - value(before, "govgate_requests_total", endpoint=CHAT, model="", status="4xx", code="model_not_found") == 1


async def test_metrics_answer_without_redis_and_say_so(settings, short_tmp):
    own = RedisProcess.start(short_tmp("gg-mr-"), persist=False)
    try:
        async with AsyncTestClient(create_app(settings.with_(redis_url=own.url)), timeout=60) as client:
            own.stop()
            response = await client.get(urls.METRICS)
    finally:
        own.stop()
    assert response.status_code == 200
    parsed = samples(response.text)
    assert value(parsed, "govgate_cluster_read_ok") == 0
    assert not any(name == "govgate_queue_depth" for name, _ in parsed)


async def test_metrics_can_be_turned_off(settings, worker):
    async with AsyncTestClient(create_app(settings.with_(metrics_enabled=False)), timeout=60) as client:
        response = await client.get(urls.METRICS)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
