"""The embedded policy engine on the real policy and on policies built to fail.

Real regorus throughout. Every way a policy can fail to answer (no decision, a
wrong shape, an engine error, a panic, a crash, a timeout) must come back as a
deny, and the engine must keep answering afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import pytest

from gateway.policy import (
    POLICY_ERROR,
    POLICY_UNAVAILABLE,
    Decision,
    EmbeddedPolicyEngine,
    MalformedDecision,
    Obligations,
    PolicyEngine,
    PolicyLoadError,
    Reason,
    policy_files,
    policy_revision,
)
from gateway.policy.decision import Limits, Redaction, UsageLimits
from gateway.policy.child import _build_engine, _evaluate
from tests.opa_fixtures import POLICY_DIR
from workers.contract.registry import ModelSpec

TIMEOUT_S = 5.0

TINY = ModelSpec(name="govgate-tiny", path=Path("unused.gguf"), tags=("tiny",))
BIG = ModelSpec(name="big", path=Path("unused.gguf"), context_length=4096)

ALLOW = '{"allow": true, "reasons": [], "obligations": {"max_tokens": 7, "prompt_logging": "full"}}'

# Takes minutes if left alone: 10^12 products.
SLOW = """
slow_count := count([p |
	some i in numbers.range(1, 1000000)
	some j in numbers.range(1, 1000000)
	p := i * j
])
"""

# Slow only when the input asks: the load-time trial evaluation (empty input) stays quick.
SLOW_WHEN_ASKED = f"""{SLOW}
decision := {ALLOW} if not input.slow

decision := {ALLOW} if {{
	input.slow
	slow_count > 0
}}

visible_models := set()
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request_input(roles: list[str], model: ModelSpec = TINY, max_tokens: int = 100) -> dict[str, Any]:
    """A policy input as the gateway builds it (DESIGN.md, "Policy input")."""
    return {
        "principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
        "request": {
            "endpoint": "chat.completions",
            "model": model.name,
            "messages": [{"role": "user", "content": "hello"}],
            "text": "hello",
            "max_tokens": max_tokens,
            "stream": False,
            "purpose": None,
        },
        "model": model.policy_view(),
        "time": {"now_ns": 1_700_000_000_000_000_000, "hour_utc": 12, "weekday": "Tuesday"},
    }


def with_text(policy_input: dict[str, Any], text: str) -> dict[str, Any]:
    return {**policy_input, "request": {**policy_input["request"], "text": text}}


def write_policy(folder: Path, rego: str, data: dict[str, Any] | None = None) -> Path:
    """A policy folder holding one module (``package govgate`` added) and optional data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.rego").write_text("package govgate\n\n" + rego)
    if data is not None:
        (folder / "data.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
async def shipped() -> AsyncIterator[EmbeddedPolicyEngine]:
    """The engine on the policy that ships in policies/."""
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S)
    try:
        yield engine
    finally:
        await engine.aclose()


async def engine_for(folder: Path, rego: str, timeout_s: float = TIMEOUT_S) -> EmbeddedPolicyEngine:
    return EmbeddedPolicyEngine.load(write_policy(folder, rego), timeout_s)


def exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def codes(decision: Decision) -> list[str]:
    return [reason.code for reason in decision.reasons]


# ---------------------------------------------------------------- the shipped policy


@pytest.mark.anyio
async def test_embedded_engine_is_a_policy_engine(shipped: EmbeddedPolicyEngine) -> None:
    assert isinstance(shipped, PolicyEngine)


# The limits policies/data.json gives a principal and a team without entries of their own.
SHIPPED_LIMITS = UsageLimits(
    principal=Limits(requests_per_minute=120, tokens_per_minute=20000, tokens_per_day=200000,
                     tokens_per_month=None, in_flight=8),
    team=Limits(requests_per_minute=600, tokens_per_minute=100000, tokens_per_day=1000000,
                tokens_per_month=20000000, in_flight=32),
)


def usage(principal: dict[str, Any], team: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``input.usage`` snapshot: every counter 0 unless given."""
    zero = {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
            "in_flight": 0, "minute_window_frees_in_s": 0}
    return {"principal": {**zero, **principal}, "team": None if team is None else {**zero, **team}}


@pytest.mark.anyio
async def test_analyst_allowed_granted_model(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst"]))
    assert decision == Decision(True, (), Obligations(max_tokens=100, prompt_logging="full", priority=5,
                                                      redact=(), limits=SHIPPED_LIMITS))


@pytest.mark.anyio
async def test_admin_role_priority_applies(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["admin"]))
    assert decision.obligations.priority == 2


@pytest.mark.anyio
async def test_rate_limit_denies_with_retry_after(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide({**request_input(["analyst"]),
                                     "usage": usage({"requests_last_minute": 120, "minute_window_frees_in_s": 7.5})})
    assert not decision.allow
    assert codes(decision) == ["rate_limited"]
    assert decision.reasons[0].retry_after_s == 8
    assert "principal 'u-1'" in decision.reasons[0].message and "requests_per_minute" in decision.reasons[0].message


@pytest.mark.anyio
async def test_team_budget_binds_and_retries_at_midnight(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide({**request_input(["analyst"]),
                                     "usage": usage({}, {"tokens_today": 999_950})})
    assert codes(decision) == ["budget_exceeded"]
    assert "team 't-1'" in decision.reasons[0].message
    assert decision.reasons[0].retry_after_s == 6400  # 2023-11-14 22:13:20 UTC to midnight


@pytest.mark.anyio
async def test_personal_data_redacted_or_denied(shipped: EmbeddedPolicyEngine) -> None:
    text = "mail ann@example.org, call +44 20 7946 0958"
    allowed = await shipped.decide(with_text(request_input(["analyst"]), text))
    assert allowed.allow
    assert allowed.obligations.prompt_logging == "redacted"
    assert allowed.obligations.redact == (Redaction("email", "ann@example.org"), Redaction("phone", "+44 20 7946 0958"))
    denied = await shipped.decide(with_text(request_input(["analyst"]), "card 4111 1111 1111 1111"))
    assert codes(denied) == ["pii_detected"]
    assert "4111" not in denied.reasons[0].message


@pytest.mark.anyio
async def test_malformed_input_denied_with_reason_not_error(shipped: EmbeddedPolicyEngine) -> None:
    bad = request_input(["analyst"])
    bad["request"] = {**bad["request"], "max_tokens": "lots", "text": None}
    bad["usage"] = {"principal": {"in_flight": "two"}, "team": None}
    decision = await shipped.decide(bad)
    assert not decision.allow
    assert set(codes(decision)) == {"invalid_input"}
    assert len(decision.reasons) == 3


@pytest.mark.anyio
async def test_analyst_denied_other_model_with_reason(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst"], BIG))
    assert not decision.allow
    assert codes(decision) == ["model_not_allowed"]
    assert "'big'" in decision.reasons[0].message


@pytest.mark.anyio
async def test_viewer_denied_every_model(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["viewer"]))
    assert not decision.allow
    assert codes(decision) == ["model_not_allowed"]


@pytest.mark.anyio
async def test_max_tokens_clamped_to_role_cap(shipped: EmbeddedPolicyEngine) -> None:
    analyst = await shipped.decide(request_input(["analyst"], max_tokens=1000))
    admin = await shipped.decide(request_input(["admin"], BIG, max_tokens=100_000))
    assert analyst.allow and analyst.obligations.max_tokens == 256
    assert admin.allow and admin.obligations.max_tokens == 4096


@pytest.mark.anyio
async def test_most_generous_cap_of_granting_roles_applies(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst", "admin"], max_tokens=1000))
    assert decision.obligations.max_tokens == 1000


@pytest.mark.anyio
async def test_unknown_role_denied_with_reason(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["stranger"]))
    assert not decision.allow
    assert codes(decision) == ["unknown_role"]
    assert "u-1" in decision.reasons[0].message


@pytest.mark.anyio
async def test_visible_models_follow_roles(shipped: EmbeddedPolicyEngine) -> None:
    views = [TINY.policy_view(), BIG.policy_view()]
    principal = request_input([])["principal"]
    assert await shipped.visible_models({**principal, "roles": ["admin"]}, views) == {"govgate-tiny", "big"}
    assert await shipped.visible_models({**principal, "roles": ["analyst"]}, views) == {"govgate-tiny"}
    assert await shipped.visible_models({**principal, "roles": ["viewer"]}, views) == set()
    assert await shipped.visible_models({**principal, "roles": ["stranger"]}, views) == set()


@pytest.mark.anyio
async def test_revision_is_that_of_the_policy_folder(shipped: EmbeddedPolicyEngine) -> None:
    assert shipped.revision == policy_revision(POLICY_DIR)
    assert len(shipped.revision) == 16 and int(shipped.revision, 16) >= 0


@pytest.mark.anyio
async def test_concurrent_coroutines_get_their_own_answers(shipped: EmbeddedPolicyEngine) -> None:
    cases = [
        (["analyst"], TINY, 50, (True, 50)),
        (["analyst"], TINY, 900, (True, 256)),
        (["analyst"], BIG, 50, (False, 0)),
        (["admin"], BIG, 5000, (True, 4096)),
        (["stranger"], TINY, 50, (False, 0)),
    ] * 40
    decisions = await asyncio.gather(*(shipped.decide(request_input(r, m, t)) for r, m, t, _ in cases))
    got = [(d.allow, d.obligations.max_tokens) for d in decisions]
    assert got == [expected for *_, expected in cases]


@pytest.mark.anyio
async def test_evaluation_cost(shipped: EmbeddedPolicyEngine, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints what one decision costs through the child process (no timing assertion)."""
    inputs = [request_input(["analyst"], max_tokens=n) for n in range(1, 301)]
    started = time.perf_counter()
    sequential = [await shipped.decide(i) for i in inputs]
    per_call = (time.perf_counter() - started) / len(inputs)
    started = time.perf_counter()
    concurrent = await asyncio.gather(*(shipped.decide(i) for i in inputs))
    per_call_concurrent = (time.perf_counter() - started) / len(inputs)
    # A long prompt full of numbers and addresses: every detector has work to do.
    busy_text = " ".join(
        f"line {i}: mail user{i}@example.org, call +44 20 7946 {i:04d}, order 2024-01-{i % 28 + 1:02d} #{i * 7919}"
        for i in range(60)
    )
    busy = [with_text(request_input(["analyst"], max_tokens=n), busy_text) for n in range(1, 51)]
    started = time.perf_counter()
    busy_decisions = [await shipped.decide(i) for i in busy]
    per_call_busy = (time.perf_counter() - started) / len(busy)
    with capsys.disabled():
        print(
            f"\n[policy cost] embedded decide: {per_call * 1e6:.0f} us/decision sequential, "
            f"{per_call_concurrent * 1e6:.0f} us/decision with {len(inputs)} concurrent, "
            f"{per_call_busy * 1e6:.0f} us/decision for a {len(busy_text)}-character prompt with "
            f"{len(busy_decisions[0].obligations.redact or ())} findings"
        )
    assert all(d.allow and d.obligations.prompt_logging == "redacted" for d in busy_decisions)
    assert [d.obligations.max_tokens for d in sequential] == list(range(1, 257)) + [256] * 44
    assert list(concurrent) == sequential


# ---------------------------------------------------------------- failing closed


@pytest.mark.anyio
async def test_undefined_decision_denied(tmp_path: Path) -> None:
    engine = await engine_for(tmp_path, f"decision := {ALLOW} if input.never\nvisible_models := set()\n")
    try:
        decision = await engine.decide(request_input(["admin"]))
    finally:
        await engine.aclose()
    assert not decision.allow
    assert codes(decision) == [POLICY_ERROR]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    [
        '{"allow": "yes", "reasons": [], "obligations": {"max_tokens": 1, "prompt_logging": "full"}}',
        '{"allow": true}',
        '{"allow": true, "reasons": [], "obligations": {"max_tokens": 1, "prompt_logging": "verbose"}}',
        '{"allow": true, "reasons": [], "obligations": {"max_tokens": 1, "prompt_logging": "full", "x": 1}}',
        '{"allow": true, "reasons": [{"code": "c", "message": "m"}], '
        '"obligations": {"max_tokens": 1, "prompt_logging": "full"}}',
        "[true]",
    ],
    ids=["allow-not-bool", "missing-keys", "unknown-logging", "unknown-obligation", "allow-with-reasons", "array"],
)
async def test_decision_of_wrong_shape_denied(tmp_path: Path, value: str) -> None:
    engine = await engine_for(tmp_path, f"decision := {value}\nvisible_models := set()\n")
    try:
        decision = await engine.decide(request_input(["admin"]))
    finally:
        await engine.aclose()
    assert not decision.allow
    assert codes(decision) == [POLICY_ERROR]
    assert "malformed" in decision.reasons[0].message


@pytest.mark.anyio
async def test_conflicting_rule_denied(tmp_path: Path) -> None:
    rego = f"""
level := 1 if input.request.stream == false
level := 2 if input.principal.id == "u-1"
decision := {ALLOW} if level
visible_models := set()
"""
    engine = await engine_for(tmp_path, rego)
    try:
        decision = await engine.decide(request_input(["admin"]))
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_ERROR]
    assert "conflict" in decision.reasons[0].message


@pytest.mark.anyio
async def test_builtin_error_denied_and_engine_keeps_answering(tmp_path: Path) -> None:
    rego = f"""
tokens := 1000 / input.request.max_tokens
decision := {ALLOW} if tokens > 0
visible_models := set()
"""
    engine = await engine_for(tmp_path, rego)
    try:
        failed = await engine.decide(request_input(["admin"], max_tokens=0))
        fine = await engine.decide(request_input(["admin"], max_tokens=10))
    finally:
        await engine.aclose()
    assert codes(failed) == [POLICY_ERROR]
    assert "divide by zero" in failed.reasons[0].message
    assert "Stack backtrace" not in failed.reasons[0].message
    assert fine.allow


@pytest.mark.anyio
async def test_timeout_is_unavailable_not_a_deny_and_evaluator_replaced(tmp_path: Path) -> None:
    engine = await engine_for(tmp_path, SLOW_WHEN_ASKED, timeout_s=2.0)
    try:
        first_pid = engine.evaluator_pid
        with anyio.fail_after(60):  # a guard against a hang, not a speed check
            timed_out = await engine.decide({**request_input(["admin"]), "slow": True})
            after = await engine.decide(request_input(["admin"]))
        second_pid = engine.evaluator_pid
    finally:
        await engine.aclose()
    assert not timed_out.allow and timed_out.is_unavailable
    assert codes(timed_out) == [POLICY_UNAVAILABLE]
    assert timed_out.reasons[0].retry_after_s == 1
    assert after.allow
    assert second_pid not in (None, first_pid)


@pytest.mark.anyio
async def test_event_loop_runs_during_a_slow_evaluation(tmp_path: Path) -> None:
    """A slow policy must not freeze other requests (regorus holds the GIL while it evaluates)."""
    engine = await engine_for(tmp_path, SLOW_WHEN_ASKED, timeout_s=2.0)
    ticks: list[float] = []

    async def tick() -> None:
        for _ in range(10):
            await anyio.sleep(0.01)
            ticks.append(time.monotonic())

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                decision = await engine.decide({**request_input(["admin"]), "slow": True})
                decided_at = time.monotonic()
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_UNAVAILABLE]
    assert len(ticks) == 10 and ticks[-1] < decided_at


@pytest.mark.anyio
async def test_evaluator_crash_during_evaluation_denied_and_recovered(tmp_path: Path) -> None:
    engine = await engine_for(tmp_path, SLOW_WHEN_ASKED, timeout_s=30.0)
    try:
        pid = engine.evaluator_pid
        assert pid is not None
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def kill_soon() -> None:
                    await anyio.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)

                tg.start_soon(kill_soon)
                crashed = await engine.decide({**request_input(["admin"]), "slow": True})
            after = await engine.decide(request_input(["admin"]))
    finally:
        await engine.aclose()
    assert codes(crashed) == [POLICY_ERROR]
    assert after.allow


@pytest.mark.anyio
async def test_evaluator_that_died_idle_is_replaced(shipped: EmbeddedPolicyEngine) -> None:
    pid = shipped.evaluator_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with anyio.fail_after(10):
        while not exited(pid):
            await anyio.sleep(0.02)
    decision = await shipped.decide(request_input(["analyst"]))
    assert decision.allow
    assert shipped.evaluator_pid not in (None, pid)


@pytest.mark.anyio
async def test_input_that_is_not_json_denied(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide({**request_input(["admin"]), "odd": {1, 2}})
    assert codes(decision) == [POLICY_ERROR]


@pytest.mark.anyio
async def test_closed_engine_denies() -> None:
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S)
    await engine.aclose()
    decision = await engine.decide(request_input(["admin"]))
    assert codes(decision) == [POLICY_ERROR]
    assert await engine.visible_models({"roles": ["admin"]}, [TINY.policy_view()]) == set()


@pytest.mark.anyio
async def test_visible_models_never_lists_a_model_not_offered(tmp_path: Path) -> None:
    engine = await engine_for(tmp_path, f'decision := {ALLOW}\nvisible_models := {{"govgate-tiny", "ghost"}}\n')
    try:
        names = await engine.visible_models({"roles": []}, [TINY.policy_view(), BIG.policy_view()])
    finally:
        await engine.aclose()
    assert names == {"govgate-tiny"}


@pytest.mark.anyio
async def test_visible_models_empty_when_policy_errs(tmp_path: Path) -> None:
    rego = f"""
decision := {ALLOW}
visible_models contains m.name if {{
	some m in input.models
	1 / count(input.principal.roles) > 0
}}
"""
    engine = await engine_for(tmp_path, rego)
    try:
        names = await engine.visible_models({"roles": []}, [TINY.policy_view()])
        names_ok = await engine.visible_models({"roles": ["x"]}, [TINY.policy_view()])
    finally:
        await engine.aclose()
    assert names == set()
    assert names_ok == {"govgate-tiny"}


def test_regorus_panic_becomes_an_error_reply() -> None:
    """A regorus panic is a BaseException (pyo3 PanicException); the child must answer, not die.

    The real panic used: an Engine used off the thread that created it.
    """
    built: list[Any] = []
    ready, done = threading.Event(), threading.Event()
    rego = f"package govgate\ndecision := {ALLOW}\nvisible_models := set()\n"

    def owner() -> None:
        built.append(_build_engine([("p.rego", rego)], []))
        ready.set()
        done.wait(10)
        built.clear()  # drop the engine on its own thread

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert ready.wait(10)
        reply = _evaluate(built[0], b"data.govgate.decision\n{}")
    finally:
        done.set()
        thread.join()
    assert reply.startswith(b"error\nregorus panicked")


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("rego", "expected"),
    [
        ("decision := {\n", "policy.rego"),
        ("allow { true }\n", "`if` keyword is required"),
        ("decision := x if x > 1\nvisible_models := set()\n", "unsafe"),
        ("visible_models := set()\n", "data.govgate.decision"),
    ],
    ids=["syntax", "rego-v0", "unsafe-variable", "no-decision-rule"],
)
def test_broken_policy_fails_at_load(tmp_path: Path, rego: str, expected: str) -> None:
    write_policy(tmp_path, rego)
    with pytest.raises(PolicyLoadError, match=expected):
        EmbeddedPolicyEngine.load(tmp_path, TIMEOUT_S)


def test_invalid_data_document_fails_at_load(tmp_path: Path) -> None:
    write_policy(tmp_path, f"decision := {ALLOW}\nvisible_models := set()\n")
    (tmp_path / "data.json").write_text('{"govgate_config": ')
    with pytest.raises(PolicyLoadError, match="data.json"):
        EmbeddedPolicyEngine.load(tmp_path, TIMEOUT_S)


def test_folder_without_modules_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="no Rego module"):
        EmbeddedPolicyEngine.load(tmp_path, TIMEOUT_S)
    with pytest.raises(PolicyLoadError, match="does not exist"):
        EmbeddedPolicyEngine.load(tmp_path / "missing", TIMEOUT_S)


@pytest.mark.anyio
async def test_data_in_a_subfolder_is_mounted_under_its_path(tmp_path: Path) -> None:
    rego = """
decision := {"allow": data.limits.extra.on, "reasons": [], "obligations": {"max_tokens": 1, "prompt_logging": "full"}}
visible_models := set()
"""
    write_policy(tmp_path, rego)
    (tmp_path / "limits" / "extra").mkdir(parents=True)
    (tmp_path / "limits" / "extra" / "data.json").write_text('{"on": true}')
    engine = EmbeddedPolicyEngine.load(tmp_path, TIMEOUT_S)
    try:
        decision = await engine.decide({})
    finally:
        await engine.aclose()
    assert decision.allow


# ---------------------------------------------------------------- revision


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(POLICY_DIR, tmp_path / "policies"))


def test_policy_files_are_modules_and_data_without_tests(policy_copy: Path) -> None:
    (policy_copy / ".hidden.rego").write_text("package x\n")
    names = [p.name for p in policy_files(policy_copy)]
    assert "govgate.rego" in names and "data.json" in names
    assert not [n for n in names if n.endswith("_test.rego") or n.startswith(".")]


def test_revision_changes_when_a_module_changes(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    with (policy_copy / "govgate.rego").open("a") as f:
        f.write("\n# edited\n")
    assert policy_revision(policy_copy) != before


def test_revision_changes_when_data_changes(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    data = json.loads((policy_copy / "data.json").read_text())
    data["govgate_config"]["roles"]["analyst"]["max_tokens"] = 512
    (policy_copy / "data.json").write_text(json.dumps(data))
    assert policy_revision(policy_copy) != before


def test_revision_changes_when_a_module_is_renamed(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    (policy_copy / "govgate.rego").rename(policy_copy / "main.rego")
    assert policy_revision(policy_copy) != before


def test_revision_ignores_tests_and_hidden_files(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    with (policy_copy / "govgate_test.rego").open("a") as f:
        f.write("\ntest_added if true\n")
    (policy_copy / ".regal.yaml").write_text("rules: {}\n")
    (policy_copy / "README.md").write_text("notes\n")
    assert policy_revision(policy_copy) == before


def test_revision_is_stable(policy_copy: Path) -> None:
    assert policy_revision(policy_copy) == policy_revision(POLICY_DIR)


# ---------------------------------------------------------------- the decision document


def test_decision_from_valid_document_round_trips() -> None:
    doc = {
        "allow": False,
        "reasons": [{"code": "over_budget", "message": "m", "retry_after_s": 30}],
        "obligations": {"max_tokens": 0, "prompt_logging": "redacted"},
    }
    decision = Decision.from_document(doc)
    assert decision.reasons == (Reason("over_budget", "m", 30.0),)
    assert decision.obligations.get("prompt_logging") == "redacted"
    assert decision.to_document()["reasons"] == [{"code": "over_budget", "message": "m", "retry_after_s": 30.0}]
    assert decision.to_document()["obligations"] == doc["obligations"]


def document(allow: object = True, reasons: object = (), **obligations: object) -> dict[str, Any]:
    """A decision document; obligations default to valid ones."""
    return {
        "allow": allow,
        "reasons": list(reasons) if isinstance(reasons, tuple) else reasons,
        "obligations": {"max_tokens": 1, "prompt_logging": "full", **obligations},
    }


REASON = {"code": "c", "message": "m"}


def test_document_helper_builds_a_valid_decision() -> None:
    """The malformed cases below differ from this valid one in one field each."""
    assert Decision.from_document(document()) == Decision(True, (), Obligations(1, "full"))
    assert Decision.from_document(document(allow=False, reasons=(REASON,))).reasons == (Reason("c", "m"),)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        document(max_tokens=True),
        document(max_tokens=-1),
        document(max_tokens=1.5),
        {**document(), "obligations": {"prompt_logging": "full"}},
        document(allow=False),
        document(allow=False, reasons=({"code": "", "message": "m"},)),
        document(allow=False, reasons=({"code": "c"},)),
        document(allow=False, reasons=({**REASON, "x": 1},)),
        document(allow=False, reasons=({**REASON, "retry_after_s": -1},)),
        document(allow=False, reasons="no"),
        {**document(), "extra": 1},
    ],
    ids=[
        "null", "max-tokens-bool", "max-tokens-negative", "max-tokens-fraction", "max-tokens-missing",
        "deny-without-reason", "empty-code", "no-message", "unknown-reason-key", "negative-retry",
        "reasons-not-list", "unknown-decision-key",
    ],
)
def test_malformed_decision_document_rejected(doc: object) -> None:
    with pytest.raises(MalformedDecision):
        Decision.from_document(doc)


FULL_OBLIGATIONS = {
    "max_tokens": 5,
    "priority": 3,
    "prompt_logging": "redacted",
    "redact": [{"detector": "email", "text": "a@example.org"}],
    "limits": {
        "principal": {"requests_per_minute": 10, "tokens_per_minute": None, "tokens_per_day": 100,
                      "tokens_per_month": None, "in_flight": 2},
        "team": None,
    },
}


def test_decision_with_every_obligation_round_trips() -> None:
    doc = {"allow": True, "reasons": [], "obligations": FULL_OBLIGATIONS}
    decision = Decision.from_document(doc)
    assert decision.obligations.priority == 3
    assert decision.obligations.redact == (Redaction("email", "a@example.org"),)
    assert decision.obligations.limits == UsageLimits(Limits(10, None, 100, None, 2), None)
    assert decision.obligations["limits"] == FULL_OBLIGATIONS["limits"]  # the mapping gives the JSON shape
    assert decision.obligations.get("redact") == FULL_OBLIGATIONS["redact"]
    assert set(decision.obligations) == set(FULL_OBLIGATIONS)
    assert decision.to_document() == doc


def test_obligations_a_policy_leaves_out_are_not_keys() -> None:
    obligations = Decision.from_document(document()).obligations
    assert set(obligations) == {"max_tokens", "prompt_logging"}
    assert obligations.get("priority") is None and obligations.limits is None


PRINCIPAL_LIMITS = FULL_OBLIGATIONS["limits"]["principal"]


def test_team_limits_round_trip() -> None:
    limits = {"principal": PRINCIPAL_LIMITS, "team": {**PRINCIPAL_LIMITS, "in_flight": None}}
    decision = Decision.from_document(document(limits=limits))
    assert decision.obligations.limits is not None
    assert decision.obligations.limits.team == Limits(10, None, 100, None, None)


@pytest.mark.parametrize(
    "obligations",
    [
        {"priority": 10},
        {"priority": -1},
        {"priority": "high"},
        {"priority": None},
        {"limits": None},
        {"redact": "all"},
        {"redact": [{"detector": "email"}]},
        {"redact": [{"detector": "email", "text": ""}]},
        {"redact": [{"detector": "email", "text": "a", "at": 3}]},
        {"limits": {"principal": PRINCIPAL_LIMITS}},
        {"limits": {"principal": {"requests_per_minute": 10}, "team": None}},
        {"limits": {"principal": PRINCIPAL_LIMITS, "team": {**PRINCIPAL_LIMITS, "in_flight": -1}}},
        {"limits": {"principal": {**PRINCIPAL_LIMITS, "in_flight": 1.5}, "team": None}},
    ],
    ids=[
        "priority-above-9", "priority-negative", "priority-string", "priority-null", "limits-null",
        "redact-not-list", "redact-no-text", "redact-empty-text", "redact-unknown-key", "limits-no-team",
        "limits-missing-names", "limits-negative", "limits-fraction",
    ],
)
def test_malformed_new_obligation_rejected(obligations: dict[str, Any]) -> None:
    with pytest.raises(MalformedDecision):
        Decision.from_document(document(**obligations))


def test_fail_closed_is_a_deny_with_one_reason() -> None:
    decision = Decision.fail_closed(POLICY_ERROR, "broken")
    assert not decision.allow
    assert decision.reasons == (Reason(POLICY_ERROR, "broken"),)
    assert decision.obligations == Obligations(max_tokens=0, prompt_logging="hash")
