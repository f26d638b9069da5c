"""The pool of policy evaluators: decisions at once, and capacity is never a denial.

Unit tests drive :class:`EmbeddedPolicyEngine` with a real regorus child per
evaluator on policies built to be slow on demand. The HTTP tests run
``govgate serve`` (requests really in flight at once) with the real Redis,
worker and audit store: a burst of 100 requests beside a CPU burner must get
200s or retryable 503 ``policy_unavailable``, never a 403 the policy did not
decide, and every request keeps its audit entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import anyio
import httpx
import pytest
from click.testing import CliRunner

from audit import AuditEntry, AuditStore
from gateway.auth import KeyStore
from govgate.cli import main
from gateway.components import open_database
from gateway.policy import POLICY_UNAVAILABLE, EmbeddedPolicyEngine, PolicyUnavailable, open_policy_engine
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.refusals import denial
from gateway.settings import Settings, SettingsError
from govgate.supervisor import child_env
from tests.conftest import bearer, serving
from tests.policy.embedded_fixtures import ALLOW, SLOW, SLOW_WHEN_ASKED, exited, request_input, write_policy
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

SLOW_INPUT = {**request_input(["admin"]), "slow": True}


async def wait_until(condition: Any, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds (the bound guards against a hang; it is no speed check)."""
    try:
        with anyio.fail_after(timeout_s):
            while not condition():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still waiting for {what} after {timeout_s:g}s") from None


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


# ---------------------------------------------------------------- the pool itself


async def test_pool_runs_one_child_per_evaluator_and_decides_on_all_at_once(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0, evaluators=3)
    try:
        pids = engine.evaluator_pids
        assert len(set(pids)) == 3 and all(pid is not None and not exited(pid) for pid in pids)
        # Two evaluations that run for minutes hold two evaluators ...
        slow = [asyncio.create_task(engine.decide(SLOW_INPUT)) for _ in range(2)]
        await wait_until(lambda: engine.free_evaluators == 1, "two evaluators busy")
        # ... and the third still decides: one evaluator would have queued it behind them.
        with anyio.fail_after(60):
            quick = await engine.decide(request_input(["admin"]))
        assert quick.allow
        assert not any(task.done() for task in slow)
        for task in slow:  # abandoned evaluations: their children are killed and replaced
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await wait_until(lambda: engine.free_evaluators == 3, "replacements ready")
        replaced = engine.evaluator_pids
        assert len(set(replaced)) == 3 and len(set(replaced) & set(pids)) == 1
        assert all(exited(pid) for pid in set(pids) - set(replaced))
        with anyio.fail_after(60):
            decisions = await asyncio.gather(*(engine.decide(request_input(["admin"])) for _ in range(9)))
        assert all(d.allow for d in decisions)
    finally:
        await engine.aclose()
    assert all(exited(pid) for pid in replaced if pid is not None)


async def test_stuck_evaluation_is_unavailable_not_a_deny_and_others_keep_deciding(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 2.0, evaluators=2)
    try:
        with anyio.fail_after(60):
            stuck, quick = await asyncio.gather(engine.decide(SLOW_INPUT), engine.decide(request_input(["admin"])))
    finally:
        await engine.aclose()
    assert quick.allow
    assert stuck.is_unavailable and [r.code for r in stuck.reasons] == [POLICY_UNAVAILABLE]
    assert "took longer than 2s" in stuck.reasons[0].message
    assert stuck.to_document()["unavailable"] is True
    error = denial(stuck.reasons)
    assert (error.status, error.code, error.headers) == (503, POLICY_UNAVAILABLE, {"Retry-After": "1"})


async def test_no_free_evaluator_within_the_wait_bound_is_503_with_retry_after(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0, evaluators=1,
                                       wait_timeout_s=0.2)
    try:
        slow = asyncio.create_task(engine.decide(SLOW_INPUT))
        await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
        with anyio.fail_after(60):
            waited = await engine.decide(request_input(["admin"]))
            with pytest.raises(PolicyUnavailable, match="no policy evaluator became free"):
                await engine.visible_models({"roles": ["admin"]}, [])
        assert not slow.done()
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        await wait_until(lambda: engine.free_evaluators == 1, "the replacement ready")
        with anyio.fail_after(60):
            after = await engine.decide(request_input(["admin"]))
    finally:
        await engine.aclose()
    assert waited.is_unavailable and "no policy evaluator became free within 0.2s" in waited.reasons[0].message
    error = denial(waited.reasons)
    assert error.status == 503 and error.code == POLICY_UNAVAILABLE
    assert int(error.headers["Retry-After"]) >= 1
    assert error.body()["error"]["type"] == "service_unavailable_error"
    assert after.allow


async def test_closing_the_pool_ends_every_child_and_then_denies(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0, evaluators=2)
    pids = engine.evaluator_pids
    running = asyncio.create_task(engine.decide(SLOW_INPUT))
    await wait_until(lambda: engine.free_evaluators == 1, "one evaluator busy")
    with anyio.fail_after(60):
        await engine.aclose()
        interrupted = await running
        after = await engine.decide(request_input(["admin"]))
    assert all(exited(pid) for pid in pids if pid is not None)
    assert not interrupted.allow and not interrupted.is_unavailable
    assert not after.allow and not after.is_unavailable


def test_pool_settings_are_read_from_the_environment() -> None:
    default = Settings.from_env({})
    assert default.policy_evaluators == len(os.sched_getaffinity(0))
    assert default.policy_wait_timeout_s == 5.0
    own = Settings.from_env({"GOVGATE_POLICY_EVALUATORS": "3", "GOVGATE_POLICY_WAIT_TIMEOUT_S": "0.25"})
    assert (own.policy_evaluators, own.policy_wait_timeout_s) == (3, 0.25)
    assert Settings.from_env(own.to_env()).policy_evaluators == 3  # what child processes read back
    with pytest.raises(SettingsError, match="GOVGATE_POLICY_EVALUATORS"):
        Settings.from_env({"GOVGATE_POLICY_EVALUATORS": "0"})
    with pytest.raises(SettingsError, match="GOVGATE_POLICY_WAIT_TIMEOUT_S"):
        Settings.from_env({"GOVGATE_POLICY_WAIT_TIMEOUT_S": "soon"})


async def test_reload_replaces_every_evaluator_of_the_pool(tmp_path: Path) -> None:
    settings = Settings(policy_dir=write_policy(tmp_path, f"decision := {ALLOW}\nvisible_models := set()\n"),
                        policy_evaluators=2, policy_wait_timeout_s=30.0)
    first = await open_policy_engine(settings)
    assert isinstance(first, EmbeddedPolicyEngine) and first.wait_timeout_s == 30.0
    reloading = ReloadingPolicyEngine(first, lambda: open_policy_engine(settings), policy_dir=settings.policy_dir)
    old = first.evaluator_pids
    try:
        with (settings.policy_dir / "policy.rego").open("a") as rego:
            rego.write('\nvisible_models_note := "edited"\n')
        result = await reloading.reload()
        current = reloading.current
        assert isinstance(current, EmbeddedPolicyEngine)
        new = current.evaluator_pids
        decision, revision = await reloading.decide_with_revision(request_input(["admin"]))
    finally:
        await reloading.aclose()  # also ends the retiring engine
    assert result.changed and revision == result.revision != first.revision
    assert decision.allow
    assert len(old) == len(set(new)) == 2 and not set(old) & set(new)
    assert all(exited(pid) for pid in old + new if pid is not None)


# ---------------------------------------------------------------- through the gateway


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
    own = settings.with_(policy_dir=slow_on_request_policy(tmp_path / "policy"), policy_evaluators=1,
                         policy_timeout_s=8.0, policy_wait_timeout_s=1.0)
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
    assert "took longer than 8s" in refused[1].json()["error"]["message"]
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
    own = settings.with_(max_queued_per_model=500)  # the queue limit is not under test
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
