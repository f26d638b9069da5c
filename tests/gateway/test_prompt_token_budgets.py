"""Token budgets and tokens per minute count prompt and completion tokens, through the API.

The real gateway, Redis counters and a worker process; the tiny model's own
tokenizer (read from its file, as the gateway does) says how many tokens a
prompt is, so each test can set a limit that prompt tokens alone exhaust.
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.requests.lost_requests import lost_after_s
from gateway.limits.charge import prompt_tokens_to_hold, used_tokens
from tests.conftest import bearer, policy_copy
from tests.keys_and_limits import limits_for, new_key
from workers.contract.registry import TINY_MODEL_NAME, load_registry
from workers.contract.tokenizers import load_tokenizer

pytestmark = pytest.mark.anyio

#: A prompt of a few dozen tokens; each request asks for a single token back.
PROMPT = "Summarise the quarterly report of the northern warehouse, with the numbers for every week. " * 3


def prompt_tokens(settings) -> int:
    spec = load_registry(settings.models_file, settings.var_dir).get(TINY_MODEL_NAME)
    tokenizer = load_tokenizer(spec)
    assert tokenizer is not None
    return tokenizer.count(PROMPT)


async def ask(client: AsyncTestClient, key: str):
    return await client.post("/v1/completions", headers=bearer(key),
                             json={"model": TINY_MODEL_NAME, "prompt": PROMPT, "max_tokens": 1})


async def test_prompt_heavy_requests_spend_the_daily_budget(settings, worker, audit_store, tmp_path):
    p = prompt_tokens(settings)
    assert p >= 10
    budget = 3 * p  # two requests fit (each holds p + 1, then costs p + its completion); a third does not
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "pia", tokens_per_day=budget)))
    key = new_key(own, "pia", None)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        served = [await ask(client, key) for _ in range(2)]
        refused = await ask(client, key)
    assert [r.status_code for r in served] == [200, 200], [r.text for r in served]
    assert all(r.json()["usage"]["prompt_tokens"] == p for r in served)
    spent = sum(r.json()["usage"]["total_tokens"] for r in served)

    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    # what was charged: prompt + completion of both; what the next one holds: its prompt + max_tokens
    assert f"has used {spent} of {budget} tokens today; this request needs {p + 1}" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1

    first = audit_store.entries_for(served[0].headers["x-govgate-request-id"])[0]
    assert first.body["admission"]["reserved_tokens"] == p + 1
    assert first.body["admission"]["prompt_tokens"] == p
    # the wait before any gateway's sweep may end it as lost is its own gateway's (probe s57 D1)
    assert first.body["admission"]["lost_after_s"] == lost_after_s(
        own.request_timeout_s, own.generation_time_limit_s, own.redelivery_margin_s)


async def test_tokens_per_minute_count_the_prompt(settings, worker, tmp_path):
    p = prompt_tokens(settings)
    limit = p  # max_tokens alone (1) fits; the prompt with it (p + 1) does not
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "tim", tokens_per_minute=limit)))
    key = new_key(own, "tim", None)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        response = await ask(client, key)
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert f"this request alone needs {p + 1}, more than the limit" in error["message"]


def test_the_prompt_share_of_a_reservation() -> None:
    assert prompt_tokens_to_hold(37, "whatever") == 37
    # no tokenizer at the gateway: the least the prompt can be (64 bytes per token at most)
    assert prompt_tokens_to_hold(None, "x" * 640) == 10
    assert prompt_tokens_to_hold(None, "é" * 64) == 2
    assert prompt_tokens_to_hold(None, "") == 0


def test_what_a_finished_request_used() -> None:
    assert used_tokens({"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}) == 35
    assert used_tokens({"prompt_tokens": 30, "completion_tokens": 0}) == 30
    assert used_tokens(None) == used_tokens({}) == 0

