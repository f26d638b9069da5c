"""The embedded engine on regorus's compiled VM: used only as far as it answers as the interpreter does.

The policies here are real Rego on which regorus 0.13's VM and its
interpreter really disagree (the VM binds an undefined value in
``v := ref``), so each test shows what the evaluator does when the VM is
wrong: at its start-up trials, on a checked answer, and on one it does not
check. docs/architecture.md, "What a decision costs".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.observability.metrics import POLICY_VM_MISMATCHES
from gateway.policy import EmbeddedPolicyEngine
from gateway.policy.vm import CHECK_FIRST, mismatch_note
from gateway.settings import Settings, SettingsError
from tests.opa_fixtures import POLICY_DIR
from tests.policy.embedded_fixtures import TINY, anyio_backend, request_input, with_text  # noqa: F401 - fixtures

TIMEOUT_S = 10.0

OBLIGATIONS = '{"max_tokens": 7, "prompt_logging": "full"}'

#: Denies on the VM, allows on the interpreter (and OPA), when ``input.request.kind`` is "probe" and the
#: request has no ``missing`` field; both allow any other input, the start-up trials' empty one included.
DIFFERS_ON_PROBES = f"""package govgate

import rego.v1

decision := {{"allow": allowed, "reasons": [], "obligations": {OBLIGATIONS}}}

default allowed := true

allowed := false if {{
	input.request.kind == "probe"
	v := input.request.missing
	not is_string(v)
}}

visible_models := set()
"""

#: Disagrees on every input, the start-up trial's empty one included.
DIFFERS_ALWAYS = f"""package govgate

import rego.v1

decision := {{"allow": allowed, "reasons": [], "obligations": {OBLIGATIONS}}}

default allowed := true

allowed := false if {{
	v := input.request.missing
	not is_string(v)
}}

visible_models := set()
"""

#: Valid Rego the VM's compiler does not take (``with``); allows requests of the role "analyst".
NOT_COMPILED = f"""package govgate

import rego.v1

analyst if "analyst" in input.principal.roles

decision := {{"allow": allowed, "reasons": [], "obligations": {OBLIGATIONS}}}

default allowed := false

allowed if analyst with input.principal.roles as input.principal.roles

visible_models := set()
"""


def _policy(tmp_path: Path, module: str) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "govgate.rego").write_text(module, encoding="utf-8")
    return folder


def _probe(kind: str = "probe") -> dict[str, Any]:
    document = request_input(["analyst"])
    document["request"]["kind"] = kind
    return document


def _mismatches() -> float:
    return POLICY_VM_MISMATCHES._value.get()


@pytest.mark.anyio
async def test_the_shipped_policy_is_answered_on_the_compiled_vm() -> None:
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S, evaluators=2)
    try:
        notes = engine.answered_by
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
    assert len(notes) == 2 and all(note.startswith("compiled VM") for note in notes), notes
    assert decision.allow


@pytest.mark.anyio
async def test_off_only_interprets() -> None:
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S, vm="off")
    try:
        notes = engine.answered_by
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
    assert notes == ["interpreter (GOVGATE_POLICY_VM=off)"]
    assert decision.allow


@pytest.mark.anyio
async def test_a_vm_that_differs_on_a_start_up_trial_is_not_used(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ALWAYS), TIMEOUT_S)
    try:
        notes = engine.answered_by
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
    assert notes == ["interpreter (the compiled VM answers data.govgate.decision differently on a start-up trial)"]
    assert decision.allow  # the interpreter's (and OPA's) answer; the VM would deny


@pytest.mark.anyio
async def test_a_policy_the_vm_cannot_compile_is_interpreted(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, NOT_COMPILED), TIMEOUT_S)
    try:
        notes = engine.answered_by
        allowed = await engine.decide(request_input(["analyst"]))
        denied = await engine.decide(request_input(["viewer"]))
    finally:
        await engine.aclose()
    assert len(notes) == 1 and notes[0].startswith("interpreter (the compiled VM refuses the policy: "), notes
    assert "with" in notes[0]
    assert allowed.allow and not denied.allow


@pytest.mark.anyio
async def test_a_checked_answer_that_differs_is_the_interpreters_and_turns_the_vm_off(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ON_PROBES), TIMEOUT_S)
    before = _mismatches()
    try:
        assert engine.answered_by[0].startswith("compiled VM")
        agreed = await engine.decide(_probe("plain"))
        first = await engine.decide(_probe())  # among the first CHECK_FIRST answers: checked
        later = await engine.decide(_probe())
        notes = engine.answered_by
    finally:
        await engine.aclose()
    assert agreed.allow
    assert first.allow and later.allow  # the interpreter's answers, the VM's would deny
    assert _mismatches() == before + 1
    assert notes == [mismatch_note("data.govgate.decision")]


@pytest.mark.anyio
@pytest.mark.parametrize(("check_every", "caught"), [(0, False), (1, True)])
async def test_after_the_first_answers_only_the_sampled_ones_are_checked(
        tmp_path: Path, check_every: int, caught: bool) -> None:
    """Past the first CHECK_FIRST answers, one in ``check_every`` is checked (0: none): an unchecked
    difference is the VM's answer. That is the price of the sampling, and why the shipped policy's
    every case is checked on both (tests/policy/test_policy_cases.py)."""
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ON_PROBES), TIMEOUT_S, vm_check_every=check_every)
    try:
        for _ in range(CHECK_FIRST):
            assert (await engine.decide(_probe("plain"))).allow
        decision = await engine.decide(_probe())
        notes = engine.answered_by
    finally:
        await engine.aclose()
    assert decision.allow is caught
    assert notes[0].startswith("compiled VM") is not caught


@pytest.mark.anyio
async def test_a_decision_past_the_vms_instruction_budget_is_interpreted_and_the_vm_stays_on() -> None:
    """regorus's VM stops after 25,000 instructions: a prompt with some thousand findings runs past it.
    The interpreter decides that one (redacting every finding), and the VM is not taken for wrong."""
    busy = " ".join(f"line {i}: mail user{i}@example.org, call +44 20 7946 {i:04d}, order #{i * 7919}"
                    for i in range(600))
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S, vm_check_every=0)
    before = _mismatches()
    try:
        for _ in range(CHECK_FIRST):  # past the checked answers: an unchecked VM error too goes to the interpreter
            assert (await engine.decide(request_input(["analyst"]))).allow
        decision = await engine.decide(with_text(request_input(["analyst"]), busy))
        notes = engine.answered_by
    finally:
        await engine.aclose()
    assert decision.allow and len(decision.obligations.redact or ()) >= 1000
    assert notes[0].startswith("compiled VM")
    assert _mismatches() == before


def test_the_settings_name_the_vm_and_its_sampling() -> None:
    assert Settings.from_env({}).policy_vm == "auto"
    assert Settings.from_env({}).policy_vm_check_every == 100
    settings = Settings.from_env({"GOVGATE_POLICY_VM": "OFF", "GOVGATE_POLICY_VM_CHECK_EVERY": "0"})
    assert (settings.policy_vm, settings.policy_vm_check_every) == ("off", 0)
    for env in ({"GOVGATE_POLICY_VM": "rvm"}, {"GOVGATE_POLICY_VM_CHECK_EVERY": "-1"},
                {"GOVGATE_POLICY_VM_CHECK_EVERY": "1.5"}):
        with pytest.raises(SettingsError, match="GOVGATE_POLICY_VM"):
            Settings.from_env(env)


def test_the_shipped_modules_bind_values_in_bodies_with_unification() -> None:
    """``v = ref``, not ``v := ref``, in the shipped modules' rule bodies: regorus's VM binds an undefined
    value with ``:=`` (a check of an absent optional field then fires), and a module edited later must not
    bring that back where the case table has no case for it. (policies/govgate.rego says so at the top.)"""
    offending = [f"{path.name}:{number}: {line.strip()}"
                 for path in sorted(POLICY_DIR.glob("*.rego")) if not path.name.endswith("_test.rego")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.match(r"^\t+[a-z_][a-z0-9_]* := ", line)]
    assert offending == []


def test_no_shipped_else_follows_a_body_that_iterates() -> None:
    """An ``else`` after a body that iterates (``some … in``, ``some k, v in``, ``x[_]``) and fails is undefined
    on regorus's VM, in any clause of the chain and in functions too (the interpreter and OPA take the
    ``else``): the shipped modules use ``default`` there. (A comprehension on one line is fine: the VM
    takes the ``else`` after a body whose comprehension is empty.)"""
    offending = []
    for path in sorted(POLICY_DIR.glob("*.rego")):
        if path.name.endswith("_test.rego"):
            continue
        body: list[str] | None = None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if body is not None and line.startswith("}"):
                if line.startswith("} else") and any(re.search(r"^\s*some\b|\[_\]", b) for b in body):
                    offending.append(f"{path.name}:{number}: an else after a body that iterates")
                body = None
            elif body is not None:
                body.append(line)
            if line.endswith("if {"):
                body = []
    assert offending == []


def test_no_shipped_function_has_a_default() -> None:
    """regorus's VM never falls back to a function's ``default`` (``default f(_) := 0``: undefined where the
    interpreter and OPA give 0), so the shipped modules give none (policies/govgate.rego says so at the top)."""
    offending = [f"{path.name}:{number}: {line.strip()}"
                 for path in sorted(POLICY_DIR.glob("*.rego")) if not path.name.endswith("_test.rego")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.match(r"^default [a-z_][a-z0-9_.]*\(", line)]
    assert offending == []
