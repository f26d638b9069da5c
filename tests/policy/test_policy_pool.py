"""The pool of policy evaluators: decisions at once, and capacity is never a denial.

These drive :class:`EmbeddedPolicyEngine` with a real regorus child per
evaluator on policies built to be slow on demand. The same promises through
a served gateway are in ``tests/e2e/test_policy_pool_api.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.policy import POLICY_UNAVAILABLE, EmbeddedPolicyEngine, PolicyUnavailable, open_policy_engine
from gateway.policy.pool import Evaluator
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.refusals import denial
from gateway.settings import Settings, SettingsError
from tests.policy.embedded_fixtures import ALLOW, SLOW_WHEN_ASKED, exited, request_input, write_policy

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


async def test_pool_runs_one_child_per_evaluator_and_decides_on_all_at_once(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 8.0, evaluators=3)
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
        for task in slow:  # abandoned evaluations: their children are replaced once past the timeout
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


# Work that grows with input.n (n^2 products; n=1000 took ~0.5 s); the decision carries input.mark.
MARKED_WORK = """
work := count([p |
	some i in numbers.range(1, input.n)
	some j in numbers.range(1, input.n)
	p := i * j
])

decision := {"allow": true, "reasons": [], "obligations": {"max_tokens": input.mark, "prompt_logging": "full"}} if {
	work >= 0
}

visible_models := set()
"""


async def test_an_abandoned_evaluation_keeps_its_child_and_its_late_reply_answers_no_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A caller cancelled mid-evaluation (a client gone while its output was judged) left its child killed and
    restarted (a policy compile); now its reply is read and dropped, and the next decision is its own."""
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, MARKED_WORK), 60.0, evaluators=1)
    try:
        pid = engine.evaluator_pid
        abandoned = asyncio.create_task(engine.decide({**request_input(["admin"]), "n": 1000, "mark": 11}))
        await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
        await asyncio.sleep(0.05)  # the request is written: the child is evaluating it
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        with anyio.fail_after(60):  # waits for the abandoned reply, read and dropped first
            decisions = [await engine.decide({**request_input(["admin"]), "n": 1, "mark": mark}) for mark in (22, 33)]
        assert [d.obligations.max_tokens for d in decisions] == [22, 33]
        assert engine.evaluator_pid == pid and not exited(pid)
        assert "starting a new one" not in caplog.text
    finally:
        await engine.aclose()
    assert exited(pid)


async def test_an_evaluation_abandoned_while_its_request_is_written_replaces_the_child(tmp_path: Path) -> None:
    """Cut mid-write, the child holds part of a request: it cannot be brought back in step, so it is replaced."""
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, MARKED_WORK), 60.0, evaluators=1)
    try:
        pid = engine.evaluator_pid
        big = {**request_input(["admin"]), "n": 1, "mark": 11}
        big["request"] = {**big["request"], "text": "plain words " * 180_000}
        os.kill(pid, signal.SIGSTOP)  # reads nothing: the 2 MB input stays in the pipe's first fill
        abandoned = asyncio.create_task(engine.decide(big))
        await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        await wait_until(lambda: engine.free_evaluators == 1, "the replacement ready")
        assert engine.evaluator_pid != pid and exited(pid)
        with anyio.fail_after(60):
            decision = await engine.decide({**request_input(["admin"]), "n": 1, "mark": 22})
        assert decision.obligations.max_tokens == 22
    finally:
        await engine.aclose()


async def test_an_abandoned_evaluation_past_the_timeout_replaces_the_child(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 1.0, evaluators=1)
    try:
        pid = engine.evaluator_pid
        abandoned = asyncio.create_task(engine.decide(SLOW_INPUT))
        await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        await wait_until(lambda: engine.free_evaluators == 1, "the replacement ready")
        assert engine.evaluator_pid != pid and exited(pid)
    finally:
        await engine.aclose()


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


async def test_an_input_larger_than_the_pipe_is_written_in_parts_and_decided(tmp_path: Path) -> None:
    """A 2 MB prompt fills the pipe to the child many times over: the write waits for room, then decides."""
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0)
    try:
        big = request_input(["admin"])
        big["request"] = {**big["request"], "text": "plain words " * 180_000}
        with anyio.fail_after(60):
            assert (await engine.decide(big)).allow
            assert (await engine.decide(request_input(["admin"]))).allow  # the pipe is in step again
    finally:
        await engine.aclose()


async def test_a_timeout_while_writing_a_large_input_is_unavailable_and_replaces_the_child(tmp_path: Path) -> None:
    """The child is stopped, so the 2 MB input stays unread past the first pipe-full: the write itself runs
    into the timeout. (With a running child and a 1 ms timeout, a fast machine wrote it all in time, and
    a gateway descheduled until the decision was back then read it before the expired timer: allowed.)"""
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 0.2)
    try:
        pid = engine.evaluator_pid
        big = request_input(["admin"])
        big["request"] = {**big["request"], "text": "plain words " * 180_000}
        os.kill(pid, signal.SIGSTOP)  # the replacement's SIGKILL ends it stopped or not
        decision = await engine.decide(big)
        assert not decision.allow and [r.code for r in decision.reasons] == [POLICY_UNAVAILABLE]
        await wait_until(lambda: engine.free_evaluators == 1, "the replacement ready")
        assert engine.evaluator_pid != pid and exited(pid)
    finally:
        await engine.aclose()


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
        os.kill(engine.evaluator_pid, signal.SIGKILL)  # a cancel would hold it until its reply (minutes) or timeout
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


def team_input(team: str | None) -> dict[str, Any]:
    policy_input = request_input(["admin"])
    return {**policy_input, "principal": {**policy_input["principal"], "team": team}}


async def served_order(engine: EmbeddedPolicyEngine, teams: list[str | None]) -> list[str]:
    """Hold the one evaluator, line up a decision per entry of ``teams`` (in that order), free the evaluator:
    the teams in the order their decisions were made."""
    order: list[str] = []

    async def decide(label: str, team: str | None) -> None:
        decision = await engine.decide(team_input(team))
        assert decision.allow
        order.append(label)

    hold = asyncio.create_task(engine.decide(SLOW_INPUT))
    await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
    lined: list[asyncio.Task[None]] = []
    for i, team in enumerate(teams):
        lined.append(asyncio.create_task(decide(f"{team}{i}", team)))
        await wait_until(lambda: sum(engine.waiting_by_team.values()) == i + 1, f"waiter {i} in line")
    os.kill(engine.evaluator_pid, signal.SIGKILL)  # the replacement goes to the line's first turn
    await asyncio.gather(hold, return_exceptions=True)
    with anyio.fail_after(120):
        await asyncio.gather(*lined)
    return order


async def test_a_late_team_overtakes_another_teams_backlog_of_waiters(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0, evaluators=1,
                                       wait_timeout_s=120.0)
    try:
        order = await served_order(engine, ["a"] * 8 + ["b"])
    finally:
        await engine.aclose()
    # First come, first served would decide b's last, behind all of a's.
    assert order == ["a0", "b8", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]


@pytest.mark.parametrize(("shares", "first_four"), [({}, "abab"), ({"a": 3}, "aaab")])
async def test_the_line_serves_teams_by_the_policys_shares(tmp_path: Path, shares: dict[str, float],
                                                            first_four: str) -> None:
    data = {"govgate_config": {"teams": {team: {"share": share} for team, share in shares.items()}}}
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED, data), 120.0, evaluators=1,
                                       wait_timeout_s=120.0)
    try:
        order = await served_order(engine, ["a"] * 6 + ["b"] * 6)
    finally:
        await engine.aclose()
    assert sorted(label[0] for label in order[:4]) == sorted(first_four), order
    assert [label for label in order if label[0] == "a"] == [f"a{i}" for i in range(6)]  # FIFO within a team


async def test_a_waiter_that_gives_up_is_skipped_and_the_evaluator_goes_to_the_next(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 120.0, evaluators=1,
                                       wait_timeout_s=120.0)
    try:
        hold = asyncio.create_task(engine.decide(SLOW_INPUT))
        await wait_until(lambda: engine.free_evaluators == 0, "the evaluator busy")
        gone = asyncio.create_task(engine.decide(team_input("a")))
        await wait_until(lambda: engine.waiting_by_team == {"a": 1}, "a in line")
        kept = asyncio.create_task(engine.decide(team_input("a")))
        other = asyncio.create_task(engine.decide(team_input("b")))
        await wait_until(lambda: engine.waiting_by_team == {"a": 2, "b": 1}, "three in line")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert engine.waiting_by_team == {"a": 1, "b": 1}
        os.kill(engine.evaluator_pid, signal.SIGKILL)  # the replacement goes to the next in line
        await asyncio.gather(hold, return_exceptions=True)
        with anyio.fail_after(120):
            decisions = await asyncio.gather(kept, other)
        assert all(decision.allow for decision in decisions)
        assert gone.cancelled() and engine.waiting_by_team == {}
        await wait_until(lambda: engine.free_evaluators == 1, "the evaluator back")
    finally:
        await engine.aclose()


async def test_readiness_names_a_pool_whose_evaluators_are_all_dead_and_has_them_replaced(tmp_path: Path) -> None:
    """/readyz asks the engine: until replaced, the policy cannot decide anything, which readiness says instead
    of "ok". Idle evaluators found dead were replaced only at the next decision, which a load balancer
    routing on /readyz never sent: the probe itself has them replaced now, with no request."""
    engine = EmbeddedPolicyEngine.load(write_policy(tmp_path, SLOW_WHEN_ASKED), 30.0, evaluators=2)
    try:
        assert await engine.readiness_problem() is None
        pids = engine.evaluator_pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: all(exited(pid) for pid in pids), "the evaluators to die")
        assert await engine.readiness_problem() == "no policy evaluator is running"
        await wait_until(lambda: engine.free_evaluators == 2, "replacements ready")
        assert await engine.readiness_problem() is None
        assert not set(engine.evaluator_pids) & set(pids)
        with anyio.fail_after(60):
            assert (await engine.decide(request_input(["admin"]))).allow
    finally:
        await engine.aclose()


class _ClearedWhilePolled(subprocess.Popen[bytes]):
    """A real child whose first ``poll`` lets ``stop`` on another thread clear the evaluator's handle.

    It forces, every run, the interleaving test-busy once hit by chance: ``kill``
    saw a live ``_process``, and before it called ``kill()`` the replacing
    thread's ``stop`` had set ``_process`` to None.
    """

    evaluator: Evaluator

    def poll(self) -> int | None:
        self.evaluator._process = None
        return super().poll()


def test_kill_while_another_thread_stops_the_evaluator_kills_the_child_it_saw() -> None:
    evaluator = Evaluator(b"")
    child = _ClearedWhilePolled(["sleep", "30"])
    child.evaluator = evaluator
    evaluator._process = child
    try:
        evaluator.kill()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert evaluator.pid is None and not evaluator.alive
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()
