"""Usage limits hold when requests are really in flight at once, on one gateway process or two.

Each test runs ``govgate serve`` (real uvicorn) on a copy of the shipped
policy whose data document sets the limit under test, with the real Redis
counters and a real worker process.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.conftest import bearer, policy_copy, serving
from tests.keys_and_limits import limits_for, new_key
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


async def test_budget_holds_under_50_concurrent_requests(settings, worker, audit_store, tmp_path):
    budget = 300
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "bud", tokens_per_day=budget)))
    key = new_key(own, "bud", "budgeting")
    outcomes: list[httpx.Response] = []
    with serving(own, tmp_path / "serve.log") as base:
        async with httpx.AsyncClient(timeout=120) as client:  # 50 requests really in flight at once
            async def one() -> None:
                outcomes.append(await client.post(f"{base}/v1/completions", headers=bearer(key),
                                                  json={"model": TINY_MODEL_NAME, "prompt": "Count",
                                                        "max_tokens": 20}))

            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(one)
    served = [r for r in outcomes if r.status_code == 200]
    refused = [r for r in outcomes if r.status_code == 429]
    assert len(served) + len(refused) == 50, str(sorted(r.status_code for r in outcomes))
    # budgets count prompt and completion tokens
    generated = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert 0 < generated <= budget
    assert refused and all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    audited = sum(audit_store.terminal_for(r.headers["x-govgate-request-id"]).body["usage"]["total_tokens"]
                  for r in served)
    assert audited == generated <= budget


def test_rpm_limit_holds_across_two_gateway_processes(settings, worker, tmp_path):
    """Two `govgate serve` processes share Redis: exactly N requests succeed in the minute."""
    limit = 5
    # A principal no other test uses: the review tests' reviewer "rita" makes requests too, and a request of
    # hers within the minute (the same session's Redis) took one of the five.
    name = "rpm-two-gateways"
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", name, requests_per_minute=limit)))
    key = new_key(own, name, "research")
    with serving(own, tmp_path / "serve-a.log") as first, serving(own, tmp_path / "serve-b.log") as second:
        async def burst() -> list[int]:
            statuses: list[int] = []
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(base: str) -> None:
                    response = await client.post(f"{base}/v1/completions", headers=bearer(key),
                                                 json={"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1})
                    statuses.append(response.status_code)
                    if response.status_code == 429:
                        assert response.json()["error"]["code"] == "rate_limited"
                async with anyio.create_task_group() as group:
                    for i in range(14):
                        group.start_soon(one, (first, second)[i % 2])
            return statuses

        statuses = anyio.run(burst)
    assert sorted(statuses) == [200] * limit + [429] * (14 - limit)
