"""``/readyz`` and ``/metrics`` name models only to the operator's credential (gateway/api/operator_view.py).

The real app, worker, Redis and database. Without a credential the answers
hold no model name of the registry (``GET /v1/models`` shows a key only
the models it may use, and nothing without a key), yet keep what a load
balancer and a Prometheus need: the same status and checks, every figure
summed over the models. ``GOVGATE_METRICS_TOKEN`` or an admin key gives the
per-model view; any other credential is refused, not quietly served less.
"""

from __future__ import annotations

import re
import secrets

import pytest
import redis
from litestar.testing import AsyncTestClient

from gateway import urls
from gateway.app import create_app
from tests.conftest import IDLE_MODEL, bearer
from tests.ops.metrics_text import samples, value
from workers.contract.failing import FAILING_AFTER, FAILING_KEY
from workers.contract.jobs import STATUS_COMPLETED, STATUS_FAILED
from workers.contract.liveness import LIVE_SCRIPT, SLOT_SEP, WORKERS_KEY
from workers.contract.registry import TINY_MODEL_NAME
from workers.failure_streak import FailureStreak

pytestmark = pytest.mark.anyio

TOKEN = secrets.token_hex(16)
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
async def token_client(settings, worker):
    async with AsyncTestClient(create_app(settings.with_(metrics_token=TOKEN)), timeout=120) as client:
        yield client


def _names(client) -> list[str]:
    return client.app.state.components.registry.names()


def _named(text: str, names: list[str]) -> list[str]:
    """The model names ``text`` holds (as a word: "govgate-tiny" also starts "govgate-tiny-2")."""
    return [name for name in names if re.search(rf'(?<![\w.-]){re.escape(name)}(?![\w.-])', text)]


async def test_readiness_without_a_credential_names_no_model_and_keeps_its_status(token_client):
    detailed = await token_client.get(urls.READY, headers=bearer(TOKEN))
    public = await token_client.get(urls.READY)
    names = _names(token_client)
    assert detailed.status_code == public.status_code == 503  # the suite's registry has models no worker serves
    assert _named(detailed.text, names)  # the operator's view names them
    assert _named(public.text, names) == []
    body, full = public.json(), detailed.json()
    idle = [m for m in full["missing"] if m.startswith("workers:")]
    assert "workers:" + IDLE_MODEL in idle and "workers:" + TINY_MODEL_NAME not in idle
    assert body["missing"] == [m for m in full["missing"] if not m.startswith("workers:")] + ["workers"]
    assert body["checks"] == {**full["checks"], "workers": f"error: no live worker for {len(idle)} of "
                                                           f"{len(names)} models"}
    assert (body["status"], body["policy_revision"]) == (full["status"], full["policy_revision"])
    assert body["models"] == [] and body["workers"] == {}
    head = await token_client.head(urls.READY)
    assert head.status_code == 503 and head.content == b""


async def test_metrics_without_a_credential_name_no_model_and_sum_every_figure(token_client, keyring):
    response = await token_client.post(urls.CHAT_COMPLETIONS, headers=bearer(keyring["analyst"]),
                                       json={"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 4})
    assert response.status_code == 200, response.text
    public = await token_client.get(urls.METRICS)
    detailed = await token_client.get(urls.METRICS, headers=bearer(TOKEN))
    assert public.status_code == detailed.status_code == 200
    names = _names(token_client)
    assert TINY_MODEL_NAME in _named(detailed.text, names) and IDLE_MODEL in _named(detailed.text, names)
    assert _named(public.text, names) == []
    summed, full = samples(public.text), samples(detailed.text)
    assert not any("model" in dict(labels) for _, labels in summed)

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in full.items() if n == name and {**dict(ls), **labels} == dict(ls))

    for kind in ("prompt", "completion"):
        assert value(summed, "govgate_tokens_total", kind=kind) == total("govgate_tokens_total", kind=kind) > 0
    assert value(summed, "govgate_queue_wait_seconds_count") == total("govgate_queue_wait_seconds_count") >= 1
    assert value(summed, "govgate_queue_wait_seconds_bucket", le="+Inf") == \
        total("govgate_queue_wait_seconds_bucket", le="+Inf")
    assert value(summed, "govgate_workers") == total("govgate_workers") >= 1
    assert value(summed, "govgate_cluster_read_ok") == 1
    ok = {"endpoint": urls.CHAT_COMPLETIONS, "status": "2xx", "code": ""}
    assert value(summed, "govgate_requests_total", **ok) == total("govgate_requests_total", **ok) >= 1
    # What carried no model label is as it was (the process's own figures).
    assert value(summed, "govgate_policy_decision_seconds_count") == value(full, "govgate_policy_decision_seconds_count")


@pytest.mark.parametrize("route", [urls.READY, urls.METRICS])
async def test_the_per_model_view_is_for_the_token_and_admin_keys_only(token_client, keyring, route):
    for credential in (TOKEN, keyring["admin"]):
        answer = await token_client.get(route, headers=bearer(credential))
        assert answer.status_code in (200, 503) and TINY_MODEL_NAME in answer.text
    wrong = await token_client.get(route, headers=bearer(secrets.token_hex(16)))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    analyst = await token_client.get(route, headers=bearer(keyring["analyst"]))
    assert analyst.status_code == 403 and analyst.json()["error"]["code"] == "admin_forbidden"
    assert TINY_MODEL_NAME not in wrong.text + analyst.text
    head = await token_client.head(urls.READY, headers=bearer(keyring["analyst"]))
    assert head.status_code == 403


async def test_without_a_token_set_a_token_shaped_credential_is_no_key(client):
    """An empty GOVGATE_METRICS_TOKEN matches nothing: not an empty bearer, not any token."""
    for header in ("Bearer ", f"Bearer {TOKEN}"):
        answer = await client.get(urls.METRICS, headers={"Authorization": header})
        assert answer.status_code == 401 and TINY_MODEL_NAME not in answer.text


async def test_a_model_whose_every_live_worker_fails_its_jobs_is_not_ready_and_says_why(token_client, settings):
    """The suite's tiny worker marked as its pool process marks it after three own failures (the same code,
    run here: a real worker with another payload key is tests/e2e/test_privacy_leaks.py's)."""
    client = redis.Redis.from_url(settings.redis_url)
    names = _names(token_client)
    try:
        live = [m.decode() for m in client.eval(LIVE_SCRIPT, 1, WORKERS_KEY)]
        mine = [m for m in live if m.startswith(TINY_MODEL_NAME + "\n") and SLOT_SEP not in m]
        assert len(mine) == 1
        streak = FailureStreak(client, mine[0])
        for _ in range(FAILING_AFTER):
            streak.ended(STATUS_FAILED, {"code": "payload_unreadable", "message": "the worker could not unseal"})
        detailed = await token_client.get(urls.READY, headers=bearer(TOKEN))
        public = await token_client.get(urls.READY)
        full, body = detailed.json(), public.json()
        assert detailed.status_code == public.status_code == 503
        assert "workers:" + TINY_MODEL_NAME in full["missing"]
        assert full["workers"][TINY_MODEL_NAME] == 1 and full["workers_failing"] == {TINY_MODEL_NAME: 1}
        assert f"every live worker of {TINY_MODEL_NAME} fails its jobs (payload_unreadable: the worker could " \
               f"not unseal)" in full["checks"]["workers"]
        idle = len([m for m in full["missing"] if m.startswith("workers:")]) - 1
        assert body["checks"]["workers"] == (f"error: no live worker for {idle} of {len(names)} models; "
                                             f"every live worker of 1 of {len(names)} models fails its jobs")
        assert body["workers_failing"] == {} and _named(public.text, names) == []
        scraped = samples((await token_client.get(urls.METRICS, headers=bearer(TOKEN))).text)
        assert value(scraped, "govgate_workers_failing", model=TINY_MODEL_NAME) == 1
        assert value(scraped, "govgate_workers_failing", model=IDLE_MODEL) == 0
        assert value(samples((await token_client.get(urls.METRICS)).text), "govgate_workers_failing") == 1
        streak.ended(STATUS_COMPLETED)  # a job that completes clears it
        after = (await token_client.get(urls.READY, headers=bearer(TOKEN))).json()
        assert "workers:" + TINY_MODEL_NAME not in after["missing"] and after["workers_failing"] == {}
        assert "fails its jobs" not in after["checks"]["workers"]
    finally:
        client.delete(FAILING_KEY)
        client.close()
