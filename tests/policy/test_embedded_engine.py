"""The embedded policy engine (regorus in a child process) on the real policy and on policies built to fail.

Real regorus throughout. Every way a policy can fail to answer (no decision, a
wrong shape, an engine error, a panic, a crash, a timeout) must come back as a
deny, and the engine must keep answering afterwards. What the shipped policy
decides is in ``test_shipped_policy.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.policy import (
    POLICY_ERROR,
    POLICY_UNAVAILABLE,
    EmbeddedPolicyEngine,
    PolicyEngine,
    PolicyLoadError,
    policy_revision,
)
from gateway.policy.child import _build_engine, _evaluate
from gateway.policy.vm import CheckedVm
from tests.opa_fixtures import POLICY_DIR
from tests.policy.embedded_fixtures import (  # noqa: F401 - fixtures
    ALLOW,
    BIG,
    SLOW_WHEN_ASKED,
    TIMEOUT_S,
    TINY,
    anyio_backend,
    codes,
    engine_for,
    exited,
    request_input,
    shipped,
    with_text,
    write_policy,
)

# ---------------------------------------------------------------- on the shipped policy


@pytest.mark.anyio
async def test_embedded_engine_is_a_policy_engine(shipped: EmbeddedPolicyEngine) -> None:
    assert isinstance(shipped, PolicyEngine)


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
    assert timed_out.reasons[0].retry_after_s == 1 and isinstance(timed_out.reasons[0].retry_after_s, int)  # whole s
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


def _cpu_ticks(pid: int) -> int:
    """User + system CPU clock ticks the process has used (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.anyio
async def test_evaluator_crash_during_evaluation_denied_and_recovered(tmp_path: Path) -> None:
    engine = await engine_for(tmp_path, SLOW_WHEN_ASKED, timeout_s=30.0)
    try:
        pid = engine.evaluator_pid
        assert pid is not None
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def kill_soon() -> None:
                    # Kill only once the child is evaluating (burning CPU), not on a
                    # clock: on a loaded machine the request may not be written yet
                    # after a fixed delay, and the answer would then be another code.
                    idle = _cpu_ticks(pid)
                    while _cpu_ticks(pid) < idle + 5:
                        await anyio.sleep(0.02)
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
async def test_an_evaluator_loads_regorus_and_not_the_gateways_machinery(shipped: EmbeddedPolicyEngine) -> None:
    """The evaluator process imports ``gateway.policy.child``, which runs ``gateway/policy/__init__.py`` first:
    that file imports its names on first use, so the child holds neither the engine's pool nor asyncio
    (~10 MB an evaluator when it did). Its memory map says which extension modules it loaded."""
    assert (await shipped.decide(request_input(["analyst"]))).allow
    pid = shipped.evaluator_pid
    assert pid is not None
    mapped = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if len(line.split(maxsplit=5)) == 6}
    assert any("/regorus/regorus" in path for path in mapped), sorted(mapped)
    assert not [path for path in mapped if "/_asyncio." in path or "/_ssl." in path]


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
        reply = _evaluate(CheckedVm(built[0], None, frozenset(), "interpreter", 0), b"data.govgate.decision\n{}")
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


@pytest.mark.anyio
async def test_a_builtin_error_s_reason_and_log_leave_out_the_value_it_quotes(tmp_path, caplog) -> None:
    """regorus quotes the value a builtin choked on (``Got `"my card 4111…"` instead``): a prompt's text went
    into the 403's reason, the chained audit body and the log, whatever prompt_logging said (probe p3)."""
    rego = f"""
decision := {ALLOW} if input.text + 1 > 5
visible_models := set()
"""
    engine = await engine_for(tmp_path, rego)
    try:
        with caplog.at_level("WARNING"):
            decision = await engine.decide({"text": "my card SECRET-4111"})
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_ERROR]
    message = decision.reasons[0].message
    assert "SECRET" not in message and "`add`" in message and "policy.rego:" in message, message
    assert "SECRET" not in caplog.text and "policy deny" in caplog.text
