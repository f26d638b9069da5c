"""The pool of policy evaluators through a served gateway: capacity is never a denial.

``govgate serve`` (requests really in flight at once) with the real Redis,
worker and audit store: a request that finds no free evaluator, or whose
evaluation times out, gets a retryable 503 ``policy_unavailable``; a burst of
100 requests beside a CPU burner must get 200s or those 503s, never a 403 the
policy did not decide, and every request keeps its audit entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import anyio
import httpx
import pytest
from click.testing import CliRunner

from audit import AuditEntry, AuditStore
from gateway.auth import KeyStore
from govgate.cli import main
from gateway.components import open_database
from gateway.policy import POLICY_UNAVAILABLE
from gateway.settings import Settings
from govgate.supervisor import child_env
from tests.conftest import bearer, serving
from tests.policy.embedded_fixtures import ALLOW, SLOW, write_policy
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def cpu_burner() -> Iterator[subprocess.Popen]:
    """A busy neighbour: one process spinning on a core for the length of the block."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield burner
    finally:
        burner.kill()
        burner.wait()


def new_key(settings: Settings, user: str, roles: tuple[str, ...] = ("analyst",)) -> str:
    store = KeyStore(open_database(settings))
    try:
        return store.create(user, team="research", roles=list(roles)).secret
    finally:
        store.engine.dispose()


def request_entries(store: AuditStore, principal: str, after_seq: int) -> list[AuditEntry]:
    return [e for e in store.iter_entries(after_seq) if e.kind == "request" and e.principal == principal]


def head_seq(store: AuditStore) -> int:
    head = store.head()
    return head.seq if head is not None else 0


def slow_on_request_policy(folder: Path) -> Path:
    """Allows everything; takes minutes when the prompt says "slow" (the load-time trial stays quick)."""
    rego = f"""{SLOW}
decision := {ALLOW} if not contains(input.request.text, "slow")

decision := {ALLOW} if {{
	contains(input.request.text, "slow")
	slow_count > 0
}}

visible_models contains m.name if some m in input.models
"""
    return write_policy(folder, rego)


async def test_timed_out_and_waiting_requests_get_503_policy_unavailable_and_are_audited(
        settings: Settings, worker: subprocess.Popen, audit_store: AuditStore, tmp_path: Path) -> None:
    # The request decision's pool is under test: output rules off, so that a served request's output
    # judgement does not take the one evaluator (that case is tests/e2e/test_output_rules.py's).
    # The slow request holds the one evaluator for policy_timeout_s: long enough for a quick request and the
    # model listing to wait their 1 s each and be refused meanwhile, even on a busy machine; waited out once.
    own = settings.with_(policy_dir=slow_on_request_policy(tmp_path / "policy"), policy_evaluators=1,
                         policy_timeout_s=5.0, policy_wait_timeout_s=1.0, output_rules=False)
    key = new_key(own, "patience")
    start = head_seq(audit_store)
    refused: list[httpx.Response] = []
    with serving(own, tmp_path / "serve.log") as base:
        async with httpx.AsyncClient(timeout=120) as http:
            async def post(prompt: str) -> httpx.Response:
                return await http.post(f"{base}/v1/completions", headers=bearer(key),
                                       json={"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 2})

            slow = asyncio.create_task(post("slow"))
            # Until the slow one holds the only evaluator a quick one is served; then it waits 1 s and is refused.
            with anyio.fail_after(60):
                while True:
                    quick = await post("quick")
                    if quick.status_code == 503:
                        refused.append(quick)
                        # The slow one still holds the evaluator: listing models is refused alike, not empty.
                        listed = await http.get(f"{base}/v1/models", headers=bearer(key))
                        break
                    assert quick.status_code == 200, quick.text
                    assert not slow.done(), slow.text
                    await anyio.sleep(0.05)
                timed_out = await slow
            refused.append(timed_out)
            # The timed-out child is replaced; the next requests are served again.
            with anyio.fail_after(120):
                while (again := await post("quick again")).status_code == 503:
                    await anyio.sleep(int(again.headers["retry-after"]))
            assert again.status_code == 200, again.text
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == POLICY_UNAVAILABLE
        assert int(response.headers["retry-after"]) >= 1
    assert "no policy evaluator became free" in refused[0].json()["error"]["message"]
    assert listed.status_code == 503, listed.text
    assert listed.json()["error"]["code"] == POLICY_UNAVAILABLE and int(listed.headers["retry-after"]) >= 1
    assert "took longer than 5s" in refused[1].json()["error"]["message"]
    entries = request_entries(audit_store, "patience", start)
    unavailable = [e for e in entries if e.body["decision"].get("unavailable")]
    assert len(unavailable) >= 2
    assert all(e.body["decision"]["reasons"][0]["code"] == POLICY_UNAVAILABLE for e in unavailable)
    assert all(audit_store.terminal_for(e.request_id) is None for e in unavailable)  # nothing was queued
    tail = CliRunner().invoke(main, ["audit", "tail", "-n", "100"], env=child_env(own, own.redis_url),
                              catch_exceptions=False).stdout.splitlines()
    for entry in unavailable:  # the operator's view says so too, not "deny"
        assert [line.split()[-1] for line in tail if entry.request_id in line] == ["unavailable"]


async def test_burst_of_100_beside_a_cpu_burner_is_never_a_403_the_policy_did_not_decide(
        settings: Settings, worker: subprocess.Popen, audit_store: AuditStore, tmp_path: Path) -> None:
    # Neither the queue limit nor the output rules are under test (an output judgement refused for want of
    # an evaluator would be a 503 the request decision did not make).
    own = settings.with_(max_queued_per_model=500, output_rules=False)
    key = new_key(own, "burst")
    start = head_seq(audit_store)
    outcomes: dict[int, httpx.Response] = {}
    with serving(own, tmp_path / "serve.log") as base, cpu_burner():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            async def one(n: int) -> None:
                outcomes[n] = await http.post(f"{base}/v1/completions", headers=bearer(key),
                                              json={"model": TINY_MODEL_NAME, "prompt": f"burst {n}",
                                                    "max_tokens": 2})

            async with anyio.create_task_group() as group:  # 100 requests really in flight at once
                for n in range(100):
                    group.start_soon(one, n)
    assert len(outcomes) == 100
    served = [r for r in outcomes.values() if r.status_code == 200]
    unavailable = [r for r in outcomes.values() if r.status_code == 503]
    others = {r.status_code: r.text for r in outcomes.values() if r.status_code not in (200, 503)}

    assert not others  # above all no 403: the roomy limits allow every request
    for response in unavailable:
        assert response.json()["error"]["code"] == POLICY_UNAVAILABLE, response.text
        assert int(response.headers["retry-after"]) >= 1
    entries = request_entries(audit_store, "burst", start)
    assert len(entries) == 100
    assert sum(bool(e.body["decision"].get("unavailable")) for e in entries) == len(unavailable)
    assert sum(bool(e.body["decision"]["allow"]) for e in entries) == len(served)
    for response in served:
        request_id = response.headers["x-govgate-request-id"]
        assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "completion"]
