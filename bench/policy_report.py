"""The policy bench's report: aligned tables for a reader, one JSON line for a script."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench._figures import ratio, rounded, table_row
from bench.policy_inputs import Sample
from bench.policy_timing import Run


def ratios(top: Run, bottom: Run) -> dict[str, float | None]:
    """top / bottom; latency above 1 and throughput below 1 mean ``top`` costs more."""
    return {"p50": ratio(top.percentile(50), bottom.percentile(50)),
            "p99": ratio(top.percentile(99), bottom.percentile(99)),
            "per_s": ratio(top.per_s, bottom.per_s)}


_LABEL_WIDTH, _CELL_WIDTH = 40, 11
_COLUMNS = ("p50 µs", "p99 µs", "per s", "failures")


def _row(label: str, cells: list[Any], suffix: str = "") -> str:
    return table_row(label, cells, (_LABEL_WIDTH, _CELL_WIDTH), suffix)


def _run_row(label: str, run: Run) -> str:
    return _row(label, [rounded(run.percentile(50)), rounded(run.percentile(99)), round(run.per_s),
                        sum(run.failures.values())])


def _ratio_row(label: str, by: dict[str, float | None]) -> str:
    return _row(label, [by["p50"], by["p99"], by["per_s"]], suffix="x")


def policy_table(policy: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Rows per engine and mode, then OPA / embedded."""
    lines = [_row("policy decisions", list(_COLUMNS))]
    runs = policy["runs"]
    for name, by_mode in runs.items():
        for mode, run in by_mode.items():
            lines.append(_run_row(f"  {name} {_mode_label(mode, args)}", run))
    if "opa" in runs:
        for mode in ("sequential", "concurrent"):
            lines.append(_ratio_row(f"  opa / embedded {_mode_label(mode, args)}",
                                    ratios(runs["opa"][mode], runs["embedded"][mode])))
        lines.append("  (latency above 1x and per s below 1x: OPA costs more; failures are fail-closed denies)")
    return lines


def throughput_line(policy: dict[str, Any], args: argparse.Namespace) -> str:
    """Embedded decisions per second at c=1 and at the bench's concurrency, the issue's headline figures."""
    runs = policy["runs"]["embedded"]
    return (f"embedded decisions/s: c=1 {round(runs['sequential'].per_s)}, c={args.concurrency} "
            f"{round(runs['concurrent'].per_s)} ({args.evaluators} evaluators)")


def cpu_lines(policy: dict[str, Any]) -> list[str]:
    """CPU per decision on each side of the evaluator pipe (absent from older result files)."""
    cpu = policy.get("cpu_per_decision")
    if not cpu:
        return []
    lines = [_row("CPU per embedded decision", ["gateway µs", "evaluator", "per s"])]
    for mode, figures in cpu.items():
        lines.append(_row(f"  {mode}", [figures["gateway_us"], figures["evaluators_us"], round(figures["per_s"])]))
    lines.append("  (gateway: this process encoding the input, the pipe round trip and the reply; "
                 "evaluator: the regorus children, from /proc)")
    return lines


def modules_table(modules: dict[str, dict[str, Any]]) -> list[str]:
    """p50 and p99 per rule module, in-process on regorus, wall and CPU clocks."""
    lines = [_row("rule modules (in-process, per input)", ["p50 µs", "p99 µs", "cpu p50", "cpu p99"])]
    for name, figures in modules.items():
        lines.append(_row(f"  {name}", [figures["p50_us"], figures["p99_us"], figures["cpu_p50_us"],
                                         figures["cpu_p99_us"]]))
    lines.append("  (each module's main rules with what they depend on; config_problems runs once per load, "
                 "never in a decision)")
    return lines


def counters_table(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """PING and counters rows per mode, the steps of a request, then counters / PING."""
    lines = [_row("usage counters (per request)", list(_COLUMNS))]
    for mode in ("sequential", "concurrent"):
        lines.append(_run_row(f"  PING {_mode_label(mode, args)}", result["ping"][mode]))
        lines.append(_run_row(f"  snapshot+reserve+settle {_mode_label(mode, args)}", result["counters"][mode]))
        for step, figures in result["steps"][mode].items():
            lines.append(_row(f"    {step}", [figures["p50_us"], figures["p99_us"]]))
    for mode in ("sequential", "concurrent"):
        lines.append(_ratio_row(f"  counters / PING {_mode_label(mode, args)}",
                                ratios(result["counters"][mode], result["ping"][mode])))
    lines.append("  (a counters request is three scripted round trips; PING is one bare round trip)")
    return lines


def _mode_label(mode: str, args: argparse.Namespace) -> str:
    return "seq" if mode == "sequential" else f"c={args.concurrency}"


def _figures(by_mode: dict[str, Run]) -> dict[str, Any]:
    return {mode: run.figures() for mode, run in by_mode.items()}


def summary(policy: dict[str, Any], opa_skipped: str, counters: dict[str, Any] | None, samples: list[Sample],
            args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the run, for the JSON line."""
    runs = policy["runs"]
    policy_doc: dict[str, Any] = {
        "revision": policy["revision"],
        "inputs": [s.name for s in samples],
        "embedded": _figures(runs["embedded"]),
        "opa": _figures(runs["opa"]) if "opa" in runs else None,
        "opa_skipped": opa_skipped or None,
        "opa_over_embedded": None if "opa" not in runs else {
            mode: ratios(runs["opa"][mode], runs["embedded"][mode]) for mode in ("sequential", "concurrent")},
        "notes": policy["notes"],
        "evaluators": args.evaluators,
        "decisions_per_s": {"c=1": round(runs["embedded"]["sequential"].per_s, 1),
                            f"c={args.concurrency}": round(runs["embedded"]["concurrent"].per_s, 1)},
        "modules": policy.get("modules"),
        "cpu_per_decision": policy.get("cpu_per_decision"),
    }
    if counters is None:
        return {"decisions": args.decisions, "requests": args.requests, "concurrency": args.concurrency,
                "warmup": args.warmup, "cpus": os.cpu_count(), "policy": policy_doc, "counters": None}
    counters_doc = {
        "ping": _figures(counters["ping"]),
        "snapshot_reserve_settle": _figures(counters["counters"]),
        "steps": counters["steps"],
        "counters_over_ping": {mode: ratios(counters["counters"][mode], counters["ping"][mode])
                               for mode in ("sequential", "concurrent")},
    }
    return {"decisions": args.decisions, "requests": args.requests, "concurrency": args.concurrency,
            "warmup": args.warmup, "cpus": os.cpu_count(), "policy": policy_doc, "counters": counters_doc}


def print_report(policy: dict[str, Any], opa_skipped: str, counters: dict[str, Any] | None, samples: list[Sample],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and the JSON line; return the JSON line's document."""
    allowed = sum(s.expect_allow for s in samples)
    print(f"policy revision {policy['revision']}; {len(samples)} inputs round robin "
          f"({allowed} allowed, {len(samples) - allowed} denied); {os.cpu_count()} CPUs")
    print("\n".join(policy_table(policy, args)))
    if opa_skipped:
        print(opa_skipped)
    for note in policy["notes"]:
        print(f"note: {note}")
    print(throughput_line(policy, args))
    for line in cpu_lines(policy):
        print(line)
    if policy.get("modules"):
        print()
        print("\n".join(modules_table(policy["modules"])))
    if counters is not None:
        print()
        print("\n".join(counters_table(counters, args)))
    document = summary(policy, opa_skipped, counters, samples, args)
    print(json.dumps(document, sort_keys=True))
    return document
