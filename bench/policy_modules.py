"""What each rule module of the shipped policy costs, timed in-process on regorus.

The gateway's evaluators run one ``data.govgate.decision`` per request; here
the same regorus build evaluates, for each input of the bench mix, the whole
decision and then each module's main rules on their own (each including the
rules it depends on, e.g. ``obligations`` needs the content findings). The
process is the bench's own, not an evaluator child: no pipe, no pool, only
``set_input_json`` and ``eval_rule_as_json``, as ``gateway/policy/child.py``
calls them.

Two clocks: wall time (``perf_counter``, what a request waits for on an idle
core) and the thread's CPU time (``thread_time``, which other processes on a
busy machine disturb far less). ``config_problems`` is timed too, though no
decision evaluates it: the loader runs it once per load.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._figures import percentile, rounded
from gateway.policy.child import DECISION_RULE
from gateway.policy.config_check import CONFIG_PROBLEMS_RULE
from gateway.policy.revision import read_policy

#: Each module's main rules (policies/*.rego), all in package govgate; pii.rego and
#: calendar.rego are helpers, timed inside the modules that call them.
#: The decision on the compiled VM, as the gateway's evaluators answer it.
VM_ROW = "decision on the compiled VM (as served)"

MODULE_RULES: dict[str, tuple[str, ...]] = {
    "decision (govgate.rego, all modules)": (DECISION_RULE,),
    "access.rego": ("data.govgate.access_denials", "data.govgate.granting"),
    "purpose.rego": ("data.govgate.purpose_denials",),
    "schedule.rego": ("data.govgate.schedule_denials",),
    "limits.rego (+ calendar.rego)": ("data.govgate.limits_denials", "data.govgate.granted_max_tokens"),
    "content.rego (+ pii.rego)": ("data.govgate.content_denials", "data.govgate.findings"),
    "obligations.rego": ("data.govgate.obligations",),
    "checks.rego input_problems": ("data.govgate.input_denials",),
    "config_problems (once per load)": (CONFIG_PROBLEMS_RULE,),
}


@dataclass(frozen=True)
class ModuleFigures:
    """p50 and p99 of one module's rules per input, in microseconds, on both clocks."""

    rules: tuple[str, ...]
    wall_us: list[float]
    cpu_us: list[float]

    def figures(self) -> dict[str, Any]:
        return {"rules": list(self.rules),
                "p50_us": rounded(percentile(self.wall_us, 50)), "p99_us": rounded(percentile(self.wall_us, 99)),
                "cpu_p50_us": rounded(percentile(self.cpu_us, 50)), "cpu_p99_us": rounded(percentile(self.cpu_us, 99))}


def build_engine(policy_dir: Path) -> Any:
    """A regorus Engine holding the policy's modules and data, as an evaluator child builds it."""
    import regorus

    snapshot = read_policy(policy_dir)
    engine = regorus.Engine()
    for path, text in snapshot.modules:
        engine.add_policy(path, text)
    for _, document in snapshot.data_documents():
        engine.add_data_json(json.dumps(document))
    return engine


def build_vm(policy_dir: Path) -> Any:
    """The decision compiled for regorus's VM, as an evaluator child compiles it; None if it does not compile."""
    import regorus

    snapshot = read_policy(policy_dir)
    data = json.dumps(snapshot.base_data())
    try:
        program = regorus.Program.compile_from_modules(data, list(snapshot.modules), [DECISION_RULE])
    except RuntimeError:
        return None
    vm = regorus.Rvm()
    vm.load_program(program)
    vm.set_data_json(data)
    return vm


def time_modules(policy_dir: Path, inputs: list[dict[str, Any]], rounds: int) -> dict[str, ModuleFigures]:
    """Each module's rules on every input, ``rounds`` times round robin (one warm-up round first).

    A module whose rules the policy does not define (an older revision) is
    left out; so is the VM's row when the policy does not compile for it.
    """
    engine = build_engine(policy_dir)
    vm = build_vm(policy_dir)
    payloads = [json.dumps(item, separators=(",", ":"), ensure_ascii=False) for item in inputs]
    modules = {name: rules for name, rules in MODULE_RULES.items() if all(_defined(engine, rule) for rule in rules)}
    results = {name: ModuleFigures(rules, [], []) for name, rules in modules.items()}
    if vm is not None:
        results = {VM_ROW: ModuleFigures((DECISION_RULE,), [], []), **results}
    for round_number in range(rounds + 1):
        if vm is not None:
            for payload in payloads:
                wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
                vm.set_input_json(payload)
                vm.execute_entry_point(DECISION_RULE)
                cpu, wall = time.thread_time_ns() - cpu, time.perf_counter_ns() - wall
                if round_number:
                    results[VM_ROW].wall_us.append(wall / 1000)
                    results[VM_ROW].cpu_us.append(cpu / 1000)
        for name, rules in modules.items():
            for payload in payloads:
                wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
                engine.set_input_json(payload)
                for rule in rules:
                    engine.eval_rule_as_json(rule)
                cpu, wall = time.thread_time_ns() - cpu, time.perf_counter_ns() - wall
                if round_number:  # round 0 warms up
                    results[name].wall_us.append(wall / 1000)
                    results[name].cpu_us.append(cpu / 1000)
    return results


def _defined(engine: Any, rule: str) -> bool:
    """Whether the policy has ``rule`` (regorus refuses to evaluate a path no rule defines)."""
    engine.set_input_json("{}")
    try:
        engine.eval_rule_as_json(rule)
    except RuntimeError as exc:
        if "not a valid rule path" in str(exc):
            return False
        raise
    return True
