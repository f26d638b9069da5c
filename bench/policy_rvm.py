"""regorus's compiled VM (RVM) against its interpreter on the shipped policy: same answers, and what CPU?

The evaluators run the shipped policy on regorus's tree-walking interpreter
(``regorus.Engine``), where every rule a decision evaluates costs about 5 µs
and every statement about 1 µs whatever it does (docs/architecture.md,
"What a decision costs"): the decision stays near 1 ms however its rules are
arranged. The same regorus build also compiles a policy into a program for
its virtual machine (``regorus.Program.compile_from_modules``, run by
``regorus.Rvm``). This bench asks, in this process, whether that would do:

1. **Same answers.** Every input of the policy bench mix
   (``data.govgate.decision``), every window of the output bench
   (``data.govgate.output_decision``) and every case of the two-engine case
   table (``tests/policy_cases/*.json``, each on its own data) is evaluated
   by both, and each difference is counted and the first few printed: the
   VM is young, and a policy it answers differently on must not be served
   by it. (It binds an undefined value in ``v := ref`` and leaves a rule
   undefined whose body failed in a ``some … in`` before its ``else``; the
   shipped modules avoid both since session 32, and the count is 0.)
2. **CPU per evaluation.** Both evaluate the same inputs round robin,
   interleaved, ``set_input_json`` included; the figures are p50 and p99 of
   the thread's CPU clock (steadier than the wall clock on a busy machine),
   and the ratio RVM / interpreter per question.

The gateway's evaluators answer on the VM, checked against the interpreter
(gateway/policy/vm.py); this bench is the measurement behind that choice,
and tells at once when a policy change brings a difference back. Nothing
here asserts a timing.

Usage::

    .venv/bin/python bench/policy_rvm.py [--rounds 20] [--policy-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/policy_rvm.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import percentile, ratio, rounded, write_json  # noqa: E402
from bench.policy_inputs import sample_inputs  # noqa: E402
from bench.policy_modules import build_engine  # noqa: E402
from bench.policy_outputs import output_windows  # noqa: E402
from gateway.policy.child import DECISION_RULE  # noqa: E402
from gateway.policy.output_decision import OUTPUT_DECISION_RULE  # noqa: E402
from gateway.policy.revision import read_policy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The questions compared: the request decision on the policy bench mix, the output decision on the output windows.
QUESTIONS = (DECISION_RULE, OUTPUT_DECISION_RULE)


#: The two-engine case table: JSON lists of {name, input, expect, data?, entry?}.
CASE_DIR = ROOT / "tests" / "policy_cases"
#: Differences printed in full (all are counted).
NOTES_SHOWN = 10


class VmEvaluator:
    """The policy compiled for regorus's VM, answering as ``Engine.eval_rule_as_json`` does (JSON text)."""

    def __init__(self, policy_dir: Path) -> None:
        import regorus

        snapshot = read_policy(policy_dir)
        data = json.dumps(snapshot.base_data())
        program = regorus.Program.compile_from_modules(data, list(snapshot.modules), list(QUESTIONS))
        self._vm = regorus.Rvm()
        self._vm.load_program(program)
        self._vm.set_data_json(data)

    def set_input_json(self, payload: str) -> None:
        self._vm.set_input_json(payload)

    def eval_rule_as_json(self, rule: str) -> str:
        return self._vm.execute_entry_point(rule)


def jobs() -> list[tuple[str, str, str]]:
    """(label, rule, input JSON) for every input the two evaluators are compared on."""
    requests = [(f"decision: {s.name}", DECISION_RULE, json.dumps(s.input, ensure_ascii=False)) for s in sample_inputs()]
    outputs = [(f"output: {name}", OUTPUT_DECISION_RULE, json.dumps(doc, ensure_ascii=False))
               for name, doc in output_windows().items()]
    return requests + outputs


def case_table_differences(policy_dir: Path) -> tuple[int, list[str]]:
    """How many cases of the case table there are, and a note for each the two answer differently.

    Cases are grouped by their data; each group gets a copy of the policy
    folder with ``govgate_config`` replaced, as tests/policy/test_policy_cases.py
    builds them.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(CASE_DIR.glob("*.json")):
        for case in json.loads(path.read_text(encoding="utf-8")):
            case = {**case, "name": f"{path.name}::{case['name']}"}
            groups.setdefault(json.dumps(case.get("data"), sort_keys=True), []).append(case)
    total, notes = 0, []
    with tempfile.TemporaryDirectory(prefix="gg-rvm-") as work:
        for index, cases in enumerate(groups.values()):
            folder = Path(shutil.copytree(policy_dir, Path(work) / f"group-{index}"))
            if cases[0].get("data") is not None:
                data_file = folder / "data.json"
                data = json.loads(data_file.read_text(encoding="utf-8")) if data_file.exists() else {}
                data_file.write_text(json.dumps({**data, "govgate_config": cases[0]["data"]}), encoding="utf-8")
            try:
                evaluators = {"interpreter": build_engine(folder), "rvm": VmEvaluator(folder)}
            except Exception as exc:  # noqa: BLE001 - a refusal is a difference on each case of the group
                notes += [f"{case['name']}: {_error(exc)}" for case in cases]
                total += len(cases)
                continue
            work_items = [(case["name"], f"data.govgate.{case.get('entry', 'decision')}", json.dumps(case["input"]))
                          for case in cases]
            total += len(work_items)
            notes += differences(evaluators, work_items)
    return total, notes


def _error(exc: BaseException) -> str:
    return f"error: {str(exc).split('Stack backtrace:')[0].strip()[:200]}"


def differences(evaluators: dict[str, Any], work: list[tuple[str, str, str]]) -> list[str]:
    """A note for each input on which the evaluators' answers differ (or one of them fails)."""
    notes = []
    for label, rule, payload in work:
        answers = {}
        for name, evaluator in evaluators.items():
            try:
                evaluator.set_input_json(payload)
                answers[name] = json.loads(evaluator.eval_rule_as_json(rule))
            except Exception as exc:  # noqa: BLE001 - a failure is an answer to report, not a crash
                answers[name] = _error(exc)
        first, *others = answers.values()
        if any(other != first for other in others):
            notes.append(f"{label}: {_difference(answers)}")
    return notes


def _difference(answers: dict[str, Any]) -> str:
    """Which fields of the answers differ, and each evaluator's ``allow``; the answers whole when one failed."""
    values = list(answers.values())
    if all(isinstance(v, dict) for v in values):
        fields = sorted({key for v in values for key in v if any(v.get(key) != w.get(key) for w in values)})
        allows = ", ".join(f"{name} allow={answer.get('allow')}" for name, answer in answers.items())
        return f"{', '.join(fields)} differ ({allows})"
    return "; ".join(f"{name} {json.dumps(answer)[:200]}" for name, answer in answers.items())


def time_questions(evaluators: dict[str, Any], work: list[tuple[str, str, str]], rounds: int) -> dict[str, Any]:
    """CPU p50/p99 (µs) per evaluator and question, over ``rounds`` interleaved rounds (one warm-up round first)."""
    spent: dict[tuple[str, str], list[float]] = {}
    for round_number in range(rounds + 1):
        for name, evaluator in evaluators.items():
            for _, rule, payload in work:
                started = time.thread_time_ns()
                evaluator.set_input_json(payload)
                evaluator.eval_rule_as_json(rule)
                if round_number:  # round 0 warms up
                    spent.setdefault((name, rule), []).append((time.thread_time_ns() - started) / 1000)
    return {rule: {name: {"cpu_p50_us": rounded(percentile(spent[(name, rule)], 50)),
                          "cpu_p99_us": rounded(percentile(spent[(name, rule)], 99))} for name in evaluators}
            for rule in QUESTIONS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of all inputs (default 20)")
    parser.add_argument("--policy-dir", type=Path, default=ROOT / "policies")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        vm = VmEvaluator(args.policy_dir)
    except Exception as exc:  # noqa: BLE001 - the compiler's refusal is the finding
        print(f"the RVM compiler refuses the policy: {str(exc).split('Stack backtrace:')[0].strip()}")
        return 1
    evaluators = {"interpreter": build_engine(args.policy_dir), "rvm": vm}
    work = jobs()
    notes = differences(evaluators, work)
    figures = time_questions(evaluators, work, args.rounds)
    print(f"regorus in-process, {args.rounds} rounds of {len(work)} inputs, thread CPU (us)")
    print(f"{'':28}{'interp p50':>12}{'interp p99':>12}{'rvm p50':>10}{'rvm p99':>10}{'rvm / interp':>14}")
    for rule, row in figures.items():
        interp, rvm = row["interpreter"], row["rvm"]
        row["ratio_p50"] = ratio(rvm["cpu_p50_us"], interp["cpu_p50_us"])
        print(f"{rule:28}{interp['cpu_p50_us']:>12}{interp['cpu_p99_us']:>12}{rvm['cpu_p50_us']:>10}"
              f"{rvm['cpu_p99_us']:>10}{row['ratio_p50']:>14}")
    cases, case_notes = case_table_differences(args.policy_dir)
    print(f"answers differ on {len(notes)} of {len(work)} bench inputs and on {len(case_notes)} of {cases} cases "
          f"of the case table")
    for note in (notes + case_notes)[:NOTES_SHOWN]:
        print(f"note: {note}")
    document = {"figures": figures, "bench_inputs": len(work), "bench_differences": notes,
                "cases": cases, "case_differences": len(case_notes)}
    print(json.dumps(document, separators=(",", ":")))
    if args.json is not None:
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
