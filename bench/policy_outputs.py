"""What does one output decision cost, next to a request decision, on regorus?

The output rules (``data.govgate.output_decision``, policies/output.rego)
are asked once per completion and once per window of a stream, so their cost
multiplies with the output's length. Here, in this process on regorus
itself (as ``bench/policy_modules.py`` times the request rules: no pipe, no
pool), each output window of a mix is judged ``rounds`` times round robin,
and the whole request decision on the policy bench's inputs is timed in the
same rounds as the baseline. Then the same through an embedded engine as
the gateway calls it (child process, pipe round trip), one call at a time.

The window mix: clean prose of 64, 256 and 1,024 characters (64 is the
default stream hold-back, 1,024 a short completion), and 256 characters
holding an e-mail address, a masked SSN, an IBAN, a card number (a stop) and
a private key header (a stop), each for an analyst (the shipped data masks
e-mail and phone for analysts) and for an admin.

Nothing here asserts a timing; the figures are p50 and p99 in microseconds
on the wall clock and on the thread's CPU clock (steadier on a busy machine).

Usage::

    .venv/bin/python bench/policy_outputs.py [--rounds 30] [--calls 400] [--policy-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/policy_outputs.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import percentile, ratio, rounded, write_json  # noqa: E402
from bench.policy_inputs import sample_inputs  # noqa: E402
from bench.policy_modules import build_engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DECISION_RULE = "data.govgate.decision"
OUTPUT_DECISION_RULE = "data.govgate.output_decision"

_PROSE = ("The export job failed at step three because a lock wait timed out; retrying later usually "
          "helps, and the log shows which table held the lock. ")


def _prose(chars: int) -> str:
    return (_PROSE * (chars // len(_PROSE) + 1))[:chars]


def output_windows() -> dict[str, dict[str, Any]]:
    """The window mix, each an ``output_decision`` input as the gateway builds it."""
    from gateway.requests.output_input import output_policy_input

    findings = {
        "email": "Write to ops-desk@example.org for the export logs.",
        "ssn": "The customer's SSN on file is 123-45-6789.",
        "iban": "Refund to IBAN DE89 3704 0044 0532 0130 00 today.",
        "card (stop)": "The card used was 4111 1111 1111 1111, declined.",
        "private key (stop)": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA",
    }
    requests = {sample.name: sample.input for sample in sample_inputs()}
    by_role = {"analyst": next(i for i in requests.values() if "analyst" in i["principal"]["roles"]),
               "admin": next(i for i in requests.values() if "admin" in i["principal"]["roles"])}
    obligations = {"max_tokens": 256, "prompt_logging": "full", "priority": 5, "redact": []}
    windows: dict[str, dict[str, Any]] = {}
    for role, request in by_role.items():
        for chars in (64, 256, 1024):
            windows[f"{role}: clean {chars} chars"] = output_policy_input(request, obligations, _prose(chars))
        for name, sentence in findings.items():
            text = _prose(256 - len(sentence) - 1) + " " + sentence
            windows[f"{role}: 256 chars with {name}"] = output_policy_input(request, obligations, text,
                                                                             offset=512, final=False)
    return windows


def time_rules(policy_dir: Path, rounds: int) -> dict[str, dict[str, Any]]:
    """p50/p99 per window of ``output_decision``, and of ``decision`` over the request mix (the baseline)."""
    engine = build_engine(policy_dir)
    jobs: list[tuple[str, str, str]] = [(name, OUTPUT_DECISION_RULE, json.dumps(doc, ensure_ascii=False))
                                        for name, doc in output_windows().items()]
    jobs += [("request decision (policy bench mix)", DECISION_RULE, json.dumps(s.input, ensure_ascii=False))
             for s in sample_inputs()]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for round_number in range(rounds + 1):
        for name, rule, payload in jobs:
            started_wall, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
            engine.set_input_json(payload)
            engine.eval_rule_as_json(rule)
            spent_cpu, spent_wall = time.thread_time_ns() - started_cpu, time.perf_counter_ns() - started_wall
            if round_number:  # round 0 warms up
                wall.setdefault(name, []).append(spent_wall / 1000)
                cpu.setdefault(name, []).append(spent_cpu / 1000)
    return {name: {"p50_us": rounded(percentile(wall[name], 50)), "p99_us": rounded(percentile(wall[name], 99)),
                   "cpu_p50_us": rounded(percentile(cpu[name], 50)), "cpu_p99_us": rounded(percentile(cpu[name], 99))}
            for name in wall}


async def time_engine(policy_dir: Path, calls: int) -> dict[str, Any]:
    """``decide_output`` and ``decide`` through an embedded engine (child process), one call at a time."""
    from gateway.policy import EmbeddedPolicyEngine

    windows = list(output_windows().values())
    requests = [s.input for s in sample_inputs()]
    engine = await asyncio.to_thread(EmbeddedPolicyEngine.load, policy_dir, 10.0)
    try:
        figures: dict[str, Any] = {}
        for label, ask, items in (("decide_output", engine.decide_output, windows),
                                  ("decide", engine.decide, requests)):
            for item in items:  # warm-up
                await ask(item)
            spent = []
            for number in range(calls):
                started = time.perf_counter_ns()
                await ask(items[number % len(items)])
                spent.append((time.perf_counter_ns() - started) / 1000)
            figures[label] = {"p50_us": rounded(percentile(spent, 50)), "p99_us": rounded(percentile(spent, 99))}
        return figures
    finally:
        await engine.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the whole mix on regorus in-process")
    parser.add_argument("--calls", type=int, default=400, help="calls of each kind through the embedded engine")
    parser.add_argument("--policy-dir", type=Path, default=ROOT / "policies")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    rules = time_rules(args.policy_dir, args.rounds)
    baseline = rules["request decision (policy bench mix)"]
    print(f"regorus in-process, {args.rounds} rounds (us)")
    print(f"{'':44}{'p50':>9}{'p99':>9}{'cpu p50':>9}{'cpu p99':>9}{'cpu p50 / request':>19}")
    for name, row in rules.items():
        print(f"{name:44}{row['p50_us']:>9}{row['p99_us']:>9}{row['cpu_p50_us']:>9}{row['cpu_p99_us']:>9}"
              f"{ratio(row['cpu_p50_us'], baseline['cpu_p50_us']):>19}")
    engine = asyncio.run(time_engine(args.policy_dir, args.calls))
    print(f"\nembedded engine (child process, one call at a time, {args.calls} calls each, us)")
    for label, row in engine.items():
        print(f"{label:44}{row['p50_us']:>9}{row['p99_us']:>9}")
    document = {"rules": rules, "engine": engine}
    print(json.dumps(document, separators=(",", ":")))
    if args.json is not None:
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
