"""The policy evaluator process: where the gateway runs regorus (with :mod:`gateway.policy.vm`).

A ``python -c`` subprocess speaking length-framed messages on stdin and
stdout (protocol and reasons: docs/architecture.md, "Design notes by
package", gateway/policy).
"""

from __future__ import annotations

import json
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.policy.config_check import CONFIG_PROBLEMS_RULE, config_refusal
from gateway.policy.output_decision import OUTPUT_DECISION_RULE
from gateway.policy.vm import MISMATCH_FLAG, CheckedVm, compile_vm, error_text
from gateway.policy.vm_lint import vm_hazards
from gateway.policy.vm_trust import unshipped_modules

#: The rule whose value is the decision for one request.
DECISION_RULE = "data.govgate.decision"
#: The rule whose value is the set of model names a principal may use.
VISIBLE_MODELS_RULE = "data.govgate.visible_models"

#: What starts an evaluator (``sys.executable -c CHILD_COMMAND``). Not multiprocessing:
#: "spawn" re-runs the parent's main script (which breaks one without a ``__main__``
#: guard) and "fork" copies a threaded server. A process at all, not a thread: regorus holds
#: the GIL for a whole evaluation (a 0.6 s one let another thread run once) and an
#: Engine may be used only by the thread that made it.
CHILD_COMMAND = "from gateway.policy.child import child_main; child_main()"

# What regorus's eval_rule_as_json returns for an undefined rule. A rule whose
# value really is this string is no valid decision or model list either, so
# reading it as "undefined" denies in both cases.
_UNDEFINED_JSON = '"<undefined>"'

#: The evaluator's start-up trials: each rule once on an input that exercises its checks of absent fields.
TRIALS = ((DECISION_RULE, "{}"), (VISIBLE_MODELS_RULE, '{"principal":{},"models":[]}'))
#: What the output rule is first asked (the engine's probe asks the same).
_OUTPUT_TRIAL = (OUTPUT_DECISION_RULE, "{}")

# Exceptions that must end the child rather than become an error reply.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit)


def child_environment() -> dict[str, str]:
    """The parent's environment, with the folder holding ``gateway`` importable.

    regorus errors carry a long Rust backtrace when RUST_BACKTRACE=1 (set on
    some machines). RUST_LIB_BACKTRACE=0 turns that off for errors while panics
    still follow RUST_BACKTRACE; an operator who sets either keeps their value.
    """
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "0")
    env.setdefault("RUST_LIB_BACKTRACE", "0")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def child_main() -> None:
    """Child entry point: build the engine once, then answer one request at a time."""
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print must not corrupt the protocol on stdout
    try:
        setup = json.loads(recv.recv_bytes())
        modules = [tuple(m) for m in setup["modules"]]
        engine = _build_engine(modules, setup["data"])
        answers = _answerer(engine, modules, setup)
    except (EOFError, OSError):
        return
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # regorus panics are BaseException (pyo3 PanicException)
        send.send_bytes(b"error\n" + error_text(exc).encode())
        return
    send.send_bytes(b"ready\n" + json.dumps({"vm": answers.on_vm, "note": answers.note}).encode())
    while True:
        try:
            request = recv.recv_bytes()
            send.send_bytes(_evaluate(answers, request))
        except (EOFError, OSError):
            return  # the parent closed the pipe, died, or stopped us


def _answerer(engine: Any, modules: list[Any], setup: dict[str, Any]) -> CheckedVm:
    """Who answers: the compiled VM where it compiles and agrees (``setup["vm"]``), else the interpreter."""
    check_every = int(setup.get("vm_check_every", 0))
    if setup.get("vm") not in ("auto", "on") or setup.get("vm_data") is None:
        return CheckedVm(engine, None, frozenset(), "interpreter (GOVGATE_POLICY_VM=off)", check_every)
    unshipped = unshipped_modules(modules) if setup.get("vm") == "auto" else []
    if unshipped:
        more = f" and {len(unshipped) - 1} more" if len(unshipped) > 1 else ""
        return CheckedVm(engine, None, frozenset(), f"interpreter (module {unshipped[0]}{more} is not a shipped one: "
                         "regorus's compiled VM reads a builtin error as undefined where the interpreter denies; "
                         "GOVGATE_POLICY_VM=on answers it on the VM anyway)", check_every)
    hazards = vm_hazards(modules)
    if hazards:
        more = f" and {len(hazards) - 1} more" if len(hazards) > 1 else ""
        return CheckedVm(engine, None, frozenset(), "interpreter (the policy holds a construct regorus's compiled VM "
                         f"answers wrongly: {hazards[0]}{more}; README, Policy)", check_every)
    trials = list(TRIALS)
    entry_points = [rule for rule, _ in TRIALS]
    engine.set_input_json(_OUTPUT_TRIAL[1])
    try:
        engine.eval_rule_as_json(_OUTPUT_TRIAL[0])
    except RuntimeError:  # no output rule (or one failing on an empty input): the interpreter answers it
        pass
    else:
        trials.append(_OUTPUT_TRIAL)
        entry_points.append(OUTPUT_DECISION_RULE)
    return compile_vm(engine, modules, setup["vm_data"], entry_points, trials, check_every)


def _build_engine(modules: list[tuple[str, str]], data: list[str]) -> Any:
    """Compile the policy, and prove it: regorus reports some errors (unsafe
    variables, a missing entry point) only when a rule is first evaluated.
    Then check the data once (:mod:`gateway.policy.config_check`), so that no
    decision has to."""
    import regorus

    engine = regorus.Engine()
    for path, text in modules:
        engine.add_policy(path, text)
    for doc in data:
        engine.add_data_json(doc)
    for rule, trial_input in TRIALS:
        engine.set_input_json(trial_input)
        try:
            engine.eval_rule_as_json(rule)
        except RuntimeError as exc:
            if "not a valid rule path" in str(exc):
                raise RuntimeError(f"the policy defines no rule {rule}") from None
            raise RuntimeError(f"the policy fails a trial evaluation of {rule} with an empty input: {exc}") from None
    refusal = config_refusal(_config_problems(engine))
    if refusal is not None:
        raise RuntimeError(refusal)
    return engine


def _config_problems(engine: Any) -> Any:
    """The value of ``config_problems`` (None when the policy has no such rule)."""
    engine.set_input_json("{}")
    try:
        value = engine.eval_rule_as_json(CONFIG_PROBLEMS_RULE)
    except RuntimeError as exc:
        if "not a valid rule path" in str(exc):
            return None
        raise RuntimeError(f"the policy fails its data check ({CONFIG_PROBLEMS_RULE}): {exc}") from None
    return None if value == _UNDEFINED_JSON else json.loads(value)


def _evaluate(answers: CheckedVm, request: bytes) -> bytes:
    """One request: ``rule\ninput-json`` in, ``status[ vm-mismatch]\nbody`` out; never raises for engine faults."""
    rule, _, payload = request.partition(b"\n")
    try:
        answer = answers.answer(rule.decode("utf-8"), payload.decode("utf-8"))
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # a bug here must deny, not end the evaluator
        return b"error\n" + error_text(exc).encode("utf-8", "replace")
    status = answer.status + (MISMATCH_FLAG if answer.vm_mismatch else "")
    return status.encode() + b"\n" + answer.text.encode("utf-8", "replace")
