"""The embedded engine on regorus's compiled VM: used only as far as it answers as the interpreter does.

The policies here are real Rego on which regorus 0.13's VM and its
interpreter really disagree (the VM calls a function on an undefined
argument in a ``_`` place; it binds an undefined value in ``v := ref``), so
each test shows what the evaluator does when the VM is wrong: in the
policy's text at load, at its start-up trials, on a checked answer, and on
one it does not check. docs/architecture.md, "What a decision costs".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.observability.metrics import POLICY_VM_MISMATCHES
from gateway.policy import EmbeddedPolicyEngine
from gateway.policy.revision import read_policy
from gateway.policy.vm import CHECK_FIRST, mismatch_note
from gateway.policy.vm_lint import vm_hazards
from gateway.policy.vm_trust import unshipped_modules
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

marked(_) := true

allowed := false if {{
	input.request.kind == "probe"
	marked(input.request.missing)
}}

visible_models := set()
"""

#: Disagrees on every input, the start-up trial's empty one included.
DIFFERS_ALWAYS = f"""package govgate

import rego.v1

decision := {{"allow": allowed, "reasons": [], "obligations": {OBLIGATIONS}}}

default allowed := true

marked(_) := true

allowed := false if marked(input.request.missing)

visible_models := set()
"""

#: A denial rule whose body divides by the input's ``zero``: a builtin error on the interpreter (deny), an
#: undefined body on the VM (so the denial does not fire: allowed).
DIVIDES_BY_ZERO = f"""package govgate

import rego.v1

decision := {{"allow": allowed, "reasons": [], "obligations": {OBLIGATIONS}}}

default allowed := true

allowed := false if {{
	input.request.kind == "div"
	ratio = 10 / input.request.zero
	ratio > 1
}}

visible_models := set()
"""

#: Binds with ``:=`` in a body, which the VM gets wrong on an absent field: read off the text at load.
BINDS_WITH_ASSIGNMENT = f"""package govgate

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
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ALWAYS), TIMEOUT_S, vm="on")
    try:
        notes = engine.answered_by
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
    assert notes == ["interpreter (the compiled VM answers data.govgate.decision differently on a start-up trial)"]
    assert decision.allow  # the interpreter's (and OPA's) answer; the VM would deny


@pytest.mark.anyio
async def test_a_policy_holding_a_construct_the_vm_gets_wrong_is_interpreted(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, BINDS_WITH_ASSIGNMENT), TIMEOUT_S, vm="on")
    try:
        notes = engine.answered_by
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
    assert notes == ["interpreter (the policy holds a construct regorus's compiled VM answers wrongly: "
                     "govgate.rego:10: a body binding with := (write =); README, Policy)"]
    assert decision.allow  # the interpreter's (and OPA's) answer; the VM would deny


def test_the_constructs_read_off_a_policys_text() -> None:
    module = ("package p\n\nimport rego.v1\n\ndefault f(_) := 0\n\nx := 1 if {\n\tsome v in input.l\n\tv > 1\n"
              "} else := 2\n\ny := 1 if {\n\tw = input.a\n\tw\n}\n\nz := {k | some k in input.l}\n")
    assert vm_hazards([("p.rego", module)]) == ["p.rego:5: a function's default",
                                                 "p.rego:10: an else after a body that iterates"]
    assert vm_hazards([("q.rego", "package q\n\nx if {\n\tv := input.a\n\tv\n}\n")]) == [
        "q.rego:4: a body binding with := (write =)"]
    assert vm_hazards([(path, text) for path, text in read_policy(POLICY_DIR).modules]) == []


@pytest.mark.anyio
async def test_a_policy_the_vm_cannot_compile_is_interpreted(tmp_path: Path) -> None:
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, NOT_COMPILED), TIMEOUT_S, vm="on")
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
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ON_PROBES), TIMEOUT_S, vm="on")
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
    engine = EmbeddedPolicyEngine.load(_policy(tmp_path, DIFFERS_ON_PROBES), TIMEOUT_S, vm="on",
                                      vm_check_every=check_every)
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
    assert Settings.from_env({"GOVGATE_POLICY_VM": "on"}).policy_vm == "on"
    for env in ({"GOVGATE_POLICY_VM": "rvm"}, {"GOVGATE_POLICY_VM_CHECK_EVERY": "-1"},
                {"GOVGATE_POLICY_VM_CHECK_EVERY": "1.5"}):
        with pytest.raises(SettingsError, match="GOVGATE_POLICY_VM"):
            Settings.from_env(env)


def test_the_shipped_modules_hold_no_construct_the_vm_gets_wrong() -> None:
    """No body binding with ``:=``, no ``else`` after an iterating body, no function ``default``
    (gateway/policy/vm_lint.py): a policy holding one is interpreted only, so a shipped module edited later
    must not bring one back (policies/govgate.rego says so at the top)."""
    assert vm_hazards([(path, text) for path, text in read_policy(POLICY_DIR).modules]) == []


def _divides(zero: int) -> dict[str, Any]:
    document = _probe("div")
    document["request"]["zero"] = zero
    return document


@pytest.mark.anyio
async def test_a_policy_with_a_module_of_its_own_is_interpreted_so_a_builtin_error_denies(tmp_path: Path) -> None:
    """h10 F2: the VM reads a builtin error as an undefined body, so a denial rule dividing by zero did not
    fire once the sampled checks had passed: allowed, where the interpreter denies. ``auto`` uses the VM
    only on the shipped modules; ``on`` for any policy, with that difference."""
    folder = _policy(tmp_path, DIVIDES_BY_ZERO)
    auto = EmbeddedPolicyEngine.load(folder, TIMEOUT_S, vm_check_every=0)
    on = EmbeddedPolicyEngine.load(folder, TIMEOUT_S, vm="on", vm_check_every=0)
    try:
        notes = auto.answered_by
        for engine in (auto, on):
            for _ in range(CHECK_FIRST):  # past the answers checked on both
                assert (await engine.decide(_divides(20))).allow  # 0.5: no denial
        denied = await auto.decide(_divides(0))
        slipped = await on.decide(_divides(0))
    finally:
        await auto.aclose()
        await on.aclose()
    assert notes == ["interpreter (module govgate.rego is not a shipped one: regorus's compiled VM reads a builtin "
                     "error as undefined where the interpreter denies; GOVGATE_POLICY_VM=on answers it on the VM "
                     "anyway)"]
    assert not denied.allow and [r.code for r in denied.reasons] == ["policy_error"]
    assert "divide by zero" in denied.reasons[0].message
    assert slipped.allow  # why ``on`` is not the default


def test_the_shipped_modules_are_the_ones_the_vm_trusts(tmp_path: Path) -> None:
    """The digests recorded in the package are this checkout's modules (after editing a shipped module:
    ``python -m gateway.policy.shipped_modules`` prints the new table), and a module beside them in the
    shipped folder (an operator's, in the default GOVGATE_POLICY_DIR) is not trusted (probe p3)."""
    from gateway.policy.shipped_modules import SHIPPED_MODULE_DIGESTS, digests_of

    assert digests_of(POLICY_DIR) == SHIPPED_MODULE_DIGESTS
    modules = list(read_policy(POLICY_DIR).modules)
    assert modules and unshipped_modules(modules) == []
    assert unshipped_modules([*modules, ("custom.rego", DIVIDES_BY_ZERO)]) == ["custom.rego"]
    changed = [(modules[0][0], modules[0][1] + "\n# an operator's comment\n"), *modules[1:]]
    assert unshipped_modules(changed) == [modules[0][0]]
    assert unshipped_modules([("custom.rego", DIVIDES_BY_ZERO)]) == ["custom.rego"]
