"""The policy trial asks at every hour of the coming week, counts a decision that times out, and asks
several decisions at once (probe q3 F4 and its closing note).

Each trial input once carried the moment of the reload: a rule on ``input.time`` failing only at another
hour or weekday loaded, then answered ``policy_error`` to every request from that hour on. A decision that
timed out was skipped as "unavailable", so a policy too slow for the decision timeout passed without having
answered anything; and the decisions were asked one at a time, although the engine has a pool of evaluators.
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from gateway.policy import EmbeddedPolicyEngine, OpaPolicyEngine
from gateway.policy.opa_sync import read_snapshot
from gateway.requests.policy_trial import policy_trial, trial_inputs
from tests.opa_fixtures import POLICY_DIR, OpaServer
from tests.policy.embedded_fixtures import SLOW
from workers.contract.registry import load_registry

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0
HOUR_NS = 3600 * 10**9


def _conflict_when(condition: str) -> str:
    """A module (package govgate, beside the shipped ones) whose rules conflict only when ``condition`` holds."""
    return ("package govgate\n\nimport rego.v1\n\n"
            f'shift := "day" if {{ {condition} }}\n'
            f'shift := "late" if {{ {condition} }}\n'
            'content_denials contains {"code": "x", "message": "y"} if shift == "nope"\n')


def _time_cases() -> dict[str, tuple[str, str]]:
    """Each rule failing at a moment other than the present (as the test starts) but within the coming week,
    and a part of the refusal naming that moment."""
    now = datetime.now(timezone.utc)
    hour = (now + timedelta(hours=7)).hour
    weekday = (now + timedelta(days=3)).strftime("%A")
    week_hour = now + timedelta(hours=100)
    fuse = now + timedelta(days=5)
    return {
        "an hour of the day": (f"input.time.hour_utc == {hour}", f" {hour:02d}:"),
        "a weekday": (f'input.time.weekday == "{weekday}"', f"at {weekday} "),
        "one hour of the week": (f'input.time.weekday == "{week_hour.strftime("%A")}"; '
                                 f"input.time.hour_utc == {week_hour.hour}",
                                 f"at {week_hour.strftime('%A')} "),
        "a moment later this week": (f"input.time.now_ns >= {int(fuse.timestamp()) * 10**9}", " UTC"),
    }


def _folder(tmp_path: Path, module: str) -> Path:
    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    (folder / "custom.rego").write_text(module, encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", sorted(_time_cases()))
async def test_a_rule_failing_only_at_another_time_is_refused_on_the_embedded_engine(tmp_path: Path,
                                                                                    case: str) -> None:
    condition, when = _time_cases()[case]
    folder = _folder(tmp_path, _conflict_when(condition))
    engine = await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S)
    try:
        refusal = await policy_trial(load_registry(None, tmp_path / "var"))(engine)
    finally:
        await engine.aclose()
    assert refusal is not None and "the policy fails on a request of role" in refusal, refusal
    assert "custom.rego" in refusal and when in refusal, refusal


@pytest.mark.parametrize("case", ["an hour of the day", "a moment later this week"])
async def test_a_rule_failing_only_at_another_time_is_refused_on_opa(start_opa: Callable[..., OpaServer],
                                                                    tmp_path: Path, case: str) -> None:
    condition, when = _time_cases()[case]
    folder = _folder(tmp_path, _conflict_when(condition))
    server = start_opa(folder)
    engine = await OpaPolicyEngine.connect(server.url, folder, TIMEOUT_S, load=False)
    try:
        refusal = await policy_trial(load_registry(None, tmp_path / "var"))(engine)
    finally:
        await engine.aclose()
    assert refusal is not None and "the policy fails on a request of role" in refusal, refusal
    assert when in refusal, refusal


def test_the_request_trials_cover_every_hour_of_the_coming_week_with_consistent_times(tmp_path: Path) -> None:
    """All 168 (weekday, hour) pairs, on the shipped data (160 request decisions, padded) and on data with one
    role; ``now_ns``, ``hour_utc`` and ``weekday`` of each input describe the same moment, now or later."""
    registry = load_registry(None, tmp_path / "var")
    now_ns = 1_800_000_000 * 10**9 + 123
    for data in (read_snapshot(POLICY_DIR).base_data(), {"govgate_config": {"roles": {"only": {}}}}):
        times = [trial.document["time"] for trial in trial_inputs(registry, data, now_ns=now_ns)]
        pairs = {(t["weekday"], t["hour_utc"]) for t in times}
        assert len(pairs) == 7 * 24, len(pairs)
        for t in times:
            moment = datetime.fromtimestamp(t["now_ns"] / 1e9, tz=timezone.utc)
            assert (moment.hour, moment.strftime("%A")) == (t["hour_utc"], t["weekday"])
            assert now_ns <= t["now_ns"] < now_ns + 7 * 24 * HOUR_NS
        assert times[0]["now_ns"] == now_ns  # the present is asked first, as before


def _slow_for_analysts_of_support() -> str:
    """Minutes for an analyst of team support on a request (any model), instant otherwise."""
    return ("package govgate\n\nimport rego.v1\n" + SLOW +
            'content_denials contains {"code": "x", "message": "y"} if {\n'
            '\t"analyst" in input.principal.roles\n\tinput.principal.team == "support"\n'
            "\tslow_count < 0\n}\n")


async def test_a_decision_that_times_out_refuses_the_folder(tmp_path: Path) -> None:
    """A decision that ran past the timeout was skipped as "unavailable": the slow folder passed, then every
    analyst of support got 503 policy_unavailable. Asked again once (a busy moment is not the policy's fault),
    a second timeout now refuses it, naming the request and the timeout."""
    folder = _folder(tmp_path, _slow_for_analysts_of_support())
    engine = await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, 0.5, evaluators=2)
    try:
        refusal = await policy_trial(load_registry(None, tmp_path / "var"))(engine)
    finally:
        await engine.aclose()
    assert refusal is not None, "a policy too slow for its timeout passed the trial"
    assert "role 'analyst', team 'support'" in refusal, refusal
    assert "0.5s" in refusal and "GOVGATE_POLICY_TIMEOUT_S" in refusal, refusal


class _Overlaps:
    """A real engine, counting the decisions in flight at once; its first decision waits (up to a generous
    bound, no timing asserted) for a second one to start beside it, which a one-at-a-time trial never does."""

    def __init__(self, engine: EmbeddedPolicyEngine) -> None:
        self.engine = engine
        self.in_flight = 0
        self.most = 0
        self._second = asyncio.Event()
        self._first = True

    @property
    def snapshot(self) -> Any:
        return self.engine.snapshot

    @property
    def evaluator_pids(self) -> list[int | None]:
        return self.engine.evaluator_pids

    async def _counted(self, call: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= 2:
            self._second.set()
        try:
            if self._first:
                self._first = False
                try:
                    await asyncio.wait_for(self._second.wait(), 20.0)
                except TimeoutError:
                    pass
            return await call
        finally:
            self.in_flight -= 1

    async def decide(self, document: dict[str, Any]) -> Any:
        return await self._counted(self.engine.decide(document))

    async def decide_output(self, document: dict[str, Any]) -> Any:
        return await self._counted(self.engine.decide_output(document))

    async def visible_models_known(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> Any:
        return await self._counted(self.engine.visible_models_known(principal, models))


async def test_the_trial_asks_as_many_decisions_at_once_as_the_engine_has_evaluators(tmp_path: Path) -> None:
    """One at a time, a policy at 20 ms a decision took 8.6 s to try (and `up` gives the API 60 s to start):
    the trial now keeps every evaluator of the pool busy, and no more."""
    engine = await asyncio.to_thread(EmbeddedPolicyEngine.load, POLICY_DIR, TIMEOUT_S, evaluators=2)
    overlaps = _Overlaps(engine)
    try:
        refusal = await policy_trial(load_registry(None, tmp_path / "var"))(overlaps)
    finally:
        await engine.aclose()
    assert refusal is None, refusal
    assert overlaps.most == 2, overlaps.most
