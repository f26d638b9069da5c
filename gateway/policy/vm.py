"""Answering policy questions on regorus's compiled VM, checked against its interpreter.

regorus evaluates a policy two ways: a tree-walking interpreter
(``regorus.Engine``, about 5 µs per rule a decision touches, so ~0.6 ms for
the shipped decision however its rules are arranged) and a compiler to a
program for its virtual machine (``regorus.Program``, run by
``regorus.Rvm``), about 0.3× the CPU (``bench/policy_rvm.py``). The VM is
young and answers some valid Rego differently (it binds an undefined value
in ``x := ref``, leaves a rule undefined whose body failed in an iteration
before its ``else``, ...: README, "Policy", lists the constructs, which the
shipped policy avoids; docs/architecture.md, "What a decision costs"). A
governance gateway cannot serve a decision that OPA and the interpreter
would not give, so the VM is used only as far as it is proven, in the
evaluator process itself:

- it must compile the policy (an unsupported builtin refuses at once);
- it must answer the evaluator's start-up trials as the interpreter does;
- each evaluator asks both for its first :data:`CHECK_FIRST` answers (the
  reload trial's decisions, one per role and model, among them) and then
  for one in ``check_every``;
- at the first difference the evaluator returns the interpreter's answer,
  says so (the gateway counts and logs it) and uses only the interpreter
  from then on.

A question the VM was not compiled for (a rule the policy lacks) and any
error the VM raises are answered by the interpreter, whose messages the
engine reads (``not a valid rule path``). The VM stops a program after
25,000 instructions (regorus's Python binding does not let that be
raised): a prompt with more than about a thousand detector findings runs
past it and is decided by the interpreter; that is a limit, not a
difference, and leaves the VM on. Any other VM error on a question the
interpreter answers is a difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

#: Answers each evaluator checks on both before it trusts the VM on samples alone.
CHECK_FIRST = 32

#: What regorus returns for an undefined rule, on both.
UNDEFINED_JSON = '"<undefined>"'

Status = Literal["ok", "undefined", "error"]

#: What the VM's error says when a program ran out of its instruction budget.
_INSTRUCTION_LIMIT = "maximum instruction limit"

#: Added to a reply's status line when the VM answered differently (the reply is the interpreter's).
MISMATCH_FLAG = " vm-mismatch"


def mismatch_note(rule: str) -> str:
    """Who answers in an evaluator whose VM answered ``rule`` differently from its interpreter."""
    return f"interpreter (the compiled VM answered {rule} differently from the interpreter; off from then on)"


@dataclass(frozen=True)
class Answer:
    """One question's answer: ``status`` with the rule's JSON (ok) or the error text (error)."""

    status: Status
    text: str = ""
    #: The VM answered differently: this is the interpreter's answer, and the VM is off now.
    vm_mismatch: bool = False

    def same_as(self, other: "Answer") -> bool:
        """Equal answers: the same status and, when ok, the same JSON value (two errors are equal: their texts
        differ by engine)."""
        if self.status != other.status:
            return False
        return self.status != "ok" or json.loads(self.text) == json.loads(other.text)


def interpret(engine: Any, rule: str, payload: str) -> Answer:
    """``rule`` on the interpreter for the input ``payload`` (JSON text)."""
    return _answer(lambda: (engine.set_input_json(payload), engine.eval_rule_as_json(rule))[1])


def run_vm(vm: Any, rule: str, payload: str) -> Answer:
    """``rule`` on the VM for the input ``payload``."""
    return _answer(lambda: (vm.set_input_json(payload), vm.execute_entry_point(rule))[1])


def _answer(evaluate: Any) -> Answer:
    try:
        value = evaluate()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # regorus panics are BaseException (pyo3 PanicException)
        return Answer("error", error_text(exc))
    if value == UNDEFINED_JSON:
        return Answer("undefined")
    return Answer("ok", value)


def error_text(exc: BaseException) -> str:
    """regorus's message without its Rust backtrace; a panic says it is one."""
    text = str(exc).split("Stack backtrace:", 1)[0].strip()
    if not isinstance(exc, Exception):
        return f"regorus panicked: {text}"
    return text


class CheckedVm:
    """The questions of one evaluator: the VM where it is proven, the interpreter otherwise.

    ``vm`` is None when the VM is off (the setting, or it could not compile
    or answer the policy alike); ``note`` says which and why, for the log.
    """

    def __init__(self, engine: Any, vm: Any, entry_points: frozenset[str], note: str, check_every: int) -> None:
        self._engine = engine
        self._vm = vm
        self._entry_points = entry_points
        self.note = note
        self._check_every = check_every
        self._answered = 0

    @property
    def on_vm(self) -> bool:
        return self._vm is not None

    def answer(self, rule: str, payload: str) -> Answer:
        if self._vm is None or rule not in self._entry_points:
            return interpret(self._engine, rule, payload)
        self._answered += 1
        fast = run_vm(self._vm, rule, payload)
        checked = self._answered <= CHECK_FIRST or (self._check_every > 0 and self._answered % self._check_every == 0)
        if fast.status != "error" and not checked:
            return fast
        slow = interpret(self._engine, rule, payload)
        if fast.same_as(slow):  # both errors too: the interpreter's message is the one the engine reads
            return slow if fast.status == "error" else fast
        if fast.status == "error" and _INSTRUCTION_LIMIT in fast.text:
            return slow  # a long program, not a wrong one
        self._vm = None
        self.note = mismatch_note(rule)
        return Answer(slow.status, slow.text, vm_mismatch=True)


def compile_vm(engine: Any, modules: list[tuple[str, str]], data_json: str, entry_points: list[str],
               trials: list[tuple[str, str]], check_every: int) -> CheckedVm:
    """The VM for ``entry_points`` of the policy, if it compiles and answers every trial as ``engine`` does.

    ``engine`` is the interpreter already holding the policy; ``trials`` are
    (rule, input JSON) pairs. Never raises for the VM's own faults: it is an
    optimisation, and the interpreter answers when it cannot.
    """
    import regorus

    try:
        program = regorus.Program.compile_from_modules(data_json, modules, entry_points)
        vm = regorus.Rvm()
        vm.load_program(program)
        vm.set_data_json(data_json)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the compiler's refusal only turns the VM off
        first = error_text(exc).splitlines()
        reason = next((line.strip() for line in first if line.strip().startswith("error:")), first[0] if first else "")
        return CheckedVm(engine, None, frozenset(), f"interpreter (the compiled VM refuses the policy: {reason})",
                         check_every)
    for rule, payload in trials:
        if rule not in entry_points:
            continue
        slow, fast = interpret(engine, rule, payload), run_vm(vm, rule, payload)
        if not fast.same_as(slow):
            return CheckedVm(engine, None, frozenset(),
                             f"interpreter (the compiled VM answers {rule} differently on a start-up trial)",
                             check_every)
    every = f", then 1 in {check_every}" if check_every > 0 else ""
    return CheckedVm(engine, vm, frozenset(entry_points),
                     f"compiled VM (checked against the interpreter: the first {CHECK_FIRST} answers{every})",
                     check_every)
