"""The report of ``bench/fairness.py``: its phases' runs folded into the ``--json`` document and the table.

Waits are pooled over the repeats (so a p95 rests on every trickled
request), shares summed over them in seconds of worker time (a long run
weighs more than a short one), throughput taken per repeat and fair against
FIFO as the median of the per-repeat ratios (the n-th fair run against the
n-th FIFO run: the machine's load drifts, neighbours share it). The
figures' definitions are in ``bench/_fairness_figures.py``.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench._fairness_figures import (
    Answer,
    Job,
    admissions_ms,
    backlogged_shares,
    handovers_ms,
    latencies_ms,
    overall_shares,
    passed_waits_ms,
    schedule,
    service_ms,
    share_error,
    throughput,
    wait_figures,
    waits_ms,
)
from bench._fairness_stack import Team
from bench._figures import percentile, rounded, table_row

__all__ = ["MODES", "PHASES", "TRICKLE_PHASES", "PhaseRun", "report", "table"]

MODES = ("fifo", "fair")
#: The phases, in the order they run: the trickle from the start, the trickle once the burst is queued, bursts.
PHASES = ("latency", "latency_queued", "shares")
TRICKLE_PHASES = ("latency", "latency_queued")
#: The issue's goals for fair share, against the equal-weight case.
GOAL_WAIT_SERVICES, GOAL_SHARE_ERROR, GOAL_THROUGHPUT = 2.0, 0.05, 0.95
#: The processes whose CPU is read around each phase (the gateway in use, the worker's two parts, Redis).
CPU_ROLES = ("gateway", "worker_main", "worker_pool", "redis")
#: The scenario whose figures head the document (the issue's two teams of equal weight).
HEADLINE_SCENARIO = "equal"


@dataclass
class PhaseRun:
    """One phase against one gateway: what was sent, what came back, what the worker did."""

    scenario: str
    phase: str
    mode: str
    teams: tuple[Team, ...]
    answers: dict[str, list[Answer]] = field(default_factory=dict)  # team -> its requests as the client saw them
    jobs: list[Job] = field(default_factory=list)  # ended as completion, in no particular order
    completions: int = 0  # the phase's requests that ended as ``completion`` in the audit
    cpu_s: dict[str, float] = field(default_factory=dict)
    gave_way: int = 0  # jobs whose start gave way to a fairer job (workers/contract/repick.py)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teams]

    @property
    def statuses(self) -> dict[str, Counter]:
        """Team -> status (or exception name) -> how many."""
        return {team: Counter(a.status for a in got) for team, got in self.answers.items()}

    @property
    def sent(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    @property
    def ok(self) -> int:
        return sum(c.get("200", 0) for c in self.statuses.values())


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _percentiles(values: Sequence[float], ranks: Sequence[int]) -> dict[str, float | None]:
    return {f"p{rank}": percentile(values, rank) for rank in ranks}


def _mode_figures(runs: Sequence[PhaseRun], phase: str) -> dict[str, Any]:
    """One scenario's phase in one mode, over its repeats."""
    teams = runs[0].teams
    names = [t.name for t in teams]
    weights = {t.name: t.share for t in teams}
    jobs_count = sum(len(r.jobs) for r in runs)
    figures: dict[str, Any] = {
        "service_ms": rounded(_median([service_ms(schedule(r.jobs)) for r in runs]), 2),
        "throughput_per_s": rounded(_median([throughput(r.jobs, _bursting(r)) for r in runs]), 2),
        "throughput_runs": [rounded(throughput(r.jobs, _bursting(r)), 2) for r in runs],
        "cpu_ms_per_job": {role: rounded(sum(r.cpu_s.get(role, 0.0) for r in runs) * 1000 / jobs_count, 2)
                           for role in CPU_ROLES} if jobs_count else {},
        "jobs": jobs_count,
        "gave_way": sum(r.gave_way for r in runs),
        # Between jobs: most of a short job's slot, and what a trickled job waits for after the slot in progress.
        "handover_ms": {k: rounded(v, 2) for k, v in _percentiles([h for r in runs for h in handovers_ms(r.jobs)],
                                                                   (50, 90)).items()},
    }
    if phase in TRICKLE_PHASES:
        pooled: dict[str, Callable[[PhaseRun, str], list[float]]] = {
            "waits_ms": lambda r, n: waits_ms(r.jobs, n),
            "passed_waits_ms": lambda r, n: passed_waits_ms(r.jobs, n),
            "admission_ms": lambda r, n: admissions_ms(r.answers.get(n, []), r.jobs),
            "latency_ms": lambda r, n: latencies_ms(r.answers.get(n, [])),
        }
        for key, values_of in pooled.items():
            figures[key] = {name: {k: rounded(v, 1) for k, v in
                                   wait_figures([v for r in runs for v in values_of(r, name)]).items()}
                            for name in names[1:]}
        shares = _summed(overall_shares, runs, names)
        figures["shares_overall"] = {n: round(s, 3) for n, s in shares.items()}
    else:
        spent = dict.fromkeys(names, 0.0)
        slots, errors = 0, []
        for r in runs:
            shares, seconds, count = backlogged_shares(r.jobs, names)
            for n in names:
                spent[n] += shares[n] * seconds
            slots += count
            errors.append(rounded(share_error(shares, weights), 3))
        total = sum(spent.values())
        shares = {n: (s / total if total else 0.0) for n, s in spent.items()}
        figures.update({"shares_backlogged": {n: round(s, 3) for n, s in shares.items()},
                        "share_error": rounded(share_error(shares, weights), 3), "share_error_runs": errors,
                        "backlogged_s": round(total, 2), "backlogged_jobs": slots})
    return figures


def _summed(share_of: Callable[[list[Job], list[str]], dict[str, float]], runs: Sequence[PhaseRun],
            names: list[str]) -> dict[str, float]:
    """Shares over several runs, each run weighted by its length."""
    spent = dict.fromkeys(names, 0.0)
    for r in runs:
        length = sum(s.seconds for s in schedule(r.jobs))
        for name, share in share_of(r.jobs, names).items():
            spent[name] += share * length
    total = sum(spent.values())
    return {n: (s / total if total else 0.0) for n, s in spent.items()}


def _bursting(run: PhaseRun) -> list[str]:
    return run.names if run.phase == "shares" else run.names[:1]


def _ratios(runs: Sequence[PhaseRun], scenario: str, phase: str) -> list[float]:
    """fair / fifo throughput, per repeat (the n-th fair run against the n-th fifo run)."""
    def series(mode: str) -> list[float | None]:
        return [throughput(r.jobs, _bursting(r)) for r in runs
                if r.scenario == scenario and r.phase == phase and r.mode == mode]

    return [f / b for f, b in zip(series("fair"), series("fifo")) if f and b]


def _cpu_ratio(fair: dict[str, Any], fifo: dict[str, Any]) -> float | None:
    """Fair's CPU per job over FIFO's, all measured processes together (the gateway, the worker, Redis)."""
    spent = [sum(v for v in side["cpu_ms_per_job"].values() if v is not None) for side in (fair, fifo)]
    return round(spent[0] / spent[1], 3) if spent[1] else None


def report(runs: Sequence[PhaseRun], settings: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document (see the module docstring)."""
    scenarios: dict[str, Any] = {}
    for scenario in dict.fromkeys(r.scenario for r in runs):
        teams = next(r.teams for r in runs if r.scenario == scenario)
        entry: dict[str, Any] = {"weights": {t.name: t.share for t in teams}}
        for phase in PHASES:
            entry[phase] = {}
            for mode in MODES:
                chosen = [r for r in runs if r.scenario == scenario and r.phase == phase and r.mode == mode]
                if chosen:
                    entry[phase][mode] = _mode_figures(chosen, phase)
            ratios = _ratios(runs, scenario, phase)
            if "fair" in entry[phase]:
                entry[phase]["fair"]["throughput_vs_fifo"] = rounded(_median(ratios), 3)
                entry[phase]["fair"]["throughput_vs_fifo_runs"] = [round(x, 3) for x in ratios]
                if "fifo" in entry[phase]:
                    entry[phase]["fair"]["cpu_per_job_vs_fifo"] = _cpu_ratio(entry[phase]["fair"],
                                                                             entry[phase]["fifo"])
        scenarios[scenario] = entry
    document: dict[str, Any] = {"settings": settings, "load": load, "scenarios": scenarios,
                                "requests": _counts(runs)}
    if HEADLINE_SCENARIO in scenarios:
        for mode in MODES:
            if mode in scenarios[HEADLINE_SCENARIO]["latency"]:
                document[mode] = _headline(scenarios[HEADLINE_SCENARIO], mode)
        if "fair" in document:
            document["goals"] = _goals(document["fair"])
    return document


def _headline(equal: dict[str, Any], mode: str) -> dict[str, Any]:
    """The issue's figures for the equal-weight case: team B's wait, one job's time, shares, throughput."""
    latency, shares = equal["latency"][mode], equal.get("shares", {}).get(mode, {})
    queued = equal.get("latency_queued", {}).get(mode)
    b = list(equal["weights"])[1]
    b_wait = latency["waits_ms"][b]
    return {"b_wait_p50_ms": b_wait["p50"], "b_wait_p95_ms": b_wait["p95"], "b_waits": b_wait["count"],
            "b_waits_passed": latency["passed_waits_ms"][b]["count"], "gave_way": latency.get("gave_way"),
            "service_ms": latency["service_ms"],
            "b_wait_p50_ms_burst_queued_first": queued["waits_ms"][b]["p50"] if queued else None,
            "b_wait_p95_ms_burst_queued_first": queued["waits_ms"][b]["p95"] if queued else None,
            "b_waits_burst_queued_first": queued["waits_ms"][b]["count"] if queued else None,
            "b_admission_p95_ms": latency["admission_ms"][b]["p95"],
            "b_latency_p50_ms": latency["latency_ms"][b]["p50"], "b_latency_p95_ms": latency["latency_ms"][b]["p95"],
            "share_error": shares.get("share_error"), "shares_backlogged": shares.get("shares_backlogged"),
            "throughput_per_s": latency["throughput_per_s"],
            "throughput_vs_fifo": latency.get("throughput_vs_fifo", 1.0 if mode == "fifo" else None)}


def _goals(fair: dict[str, Any]) -> dict[str, bool | None]:
    """Whether the equal-weight case meets the issue's goals (a report, never asserted)."""
    wait, service, error, ratio = (fair["b_wait_p95_ms"], fair["service_ms"], fair["share_error"],
                                   fair["throughput_vs_fifo"])

    def within(p95: float | None) -> bool | None:
        return None if p95 is None or not service else p95 <= GOAL_WAIT_SERVICES * service

    return {"b_wait_p95_within_2_services": within(wait),
            "b_wait_p95_within_2_services_burst_queued_first": within(fair["b_wait_p95_ms_burst_queued_first"]),
            "share_error_within_5_percent": None if error is None else error <= GOAL_SHARE_ERROR,
            "throughput_within_5_percent_of_fifo": None if ratio is None else ratio >= GOAL_THROUGHPUT}


def _counts(runs: Sequence[PhaseRun]) -> dict[str, int]:
    """Every request of every phase: sent, answered 200, ended as completion in the audit, anything else."""
    sent = sum(r.sent for r in runs)
    ok = sum(r.ok for r in runs)
    completed = sum(r.completions for r in runs)
    return {"sent": sent, "ok": ok, "completed_in_audit": completed, "not_ok": sent - ok,
            "jobs_with_timings": sum(len(r.jobs) for r in runs)}


def _common_rows(row: Callable[..., None], block: dict[str, Any]) -> None:
    """Throughput and CPU per job, and fair against FIFO, for one phase."""
    def cpu(f: dict[str, Any], *roles: str) -> float | None:
        return rounded(sum(f["cpu_ms_per_job"].get(r) or 0.0 for r in roles), 2) if f["cpu_ms_per_job"] else None

    row("  hand-over between jobs p50 / p90 ms", lambda f: f"{f['handover_ms']['p50']} / {f['handover_ms']['p90']}",
        block)
    row("  jobs that gave way at their start", lambda f: f.get("gave_way"), block)
    row("  throughput jobs/s", lambda f: f["throughput_per_s"], block)
    row("    fair / fifo (median of repeats)", lambda f: f.get("throughput_vs_fifo"), block)
    row("  CPU ms/job: worker (main + pool)", lambda f: cpu(f, "worker_main", "worker_pool"), block)
    row("  CPU ms/job: gateway, Redis", lambda f: f"{cpu(f, 'gateway')}, {cpu(f, 'redis')}", block)
    row("  CPU ms/job: all", lambda f: cpu(f, *CPU_ROLES), block)
    row("    fair / fifo", lambda f: f.get("cpu_per_job_vs_fifo"), block)


def table(document: dict[str, Any]) -> str:
    """The figures as text: one block per scenario, FIFO and fair side by side."""
    widths = (36, 12)
    lines = []
    for name, entry in document["scenarios"].items():
        weights = ", ".join(f"{t} {w:g}" for t, w in entry["weights"].items())
        lines += ["", f"{name} (weights {weights})", table_row("", MODES, widths)]
        shares = entry["shares"]

        def row(label: str, pick: Callable[[dict[str, Any]], Any], block: dict[str, Any]) -> None:
            lines.append(table_row(label, [pick(block[m]) if m in block else None for m in MODES], widths))

        first = next(iter(entry["weights"]))
        for phase, when in (("latency", "from the start"), ("latency_queued", "once the burst is queued")):
            block = entry[phase]
            lines.append(f"{phase} phase: {first} bursts, the others trickle {when}")
            for team in list(entry["weights"])[1:]:
                row(f"  {team} queue wait p50 ms", lambda f, t=team: f["waits_ms"][t]["p50"], block)
                row(f"  {team} queue wait p95 ms", lambda f, t=team: f["waits_ms"][t]["p95"], block)
                row(f"  {team} queue waits measured", lambda f, t=team: f["waits_ms"][t]["count"], block)
                row("    another team's job started first", lambda f, t=team: f["passed_waits_ms"][t]["count"], block)
                row("      their wait p50 ms", lambda f, t=team: f["passed_waits_ms"][t]["p50"], block)
                row("    in the gateway before, p50 ms", lambda f, t=team: f["admission_ms"][t]["p50"], block)
                row("    in the gateway before, p95 ms", lambda f, t=team: f["admission_ms"][t]["p95"], block)
                row(f"  {team} latency p50 ms (client)", lambda f, t=team: f["latency_ms"][t]["p50"], block)
                row(f"  {team} latency p95 ms (client)", lambda f, t=team: f["latency_ms"][t]["p95"], block)
            row("  service ms (one job, median)", lambda f: f["service_ms"], block)
            _common_rows(row, block)
        lines.append("shares phase: every team bursts")
        for team in entry["weights"]:
            row(f"  {team} share, all backlogged", lambda f, t=team: f["shares_backlogged"][t], shares)
        row("  share error", lambda f: f["share_error"], shares)
        row("  backlogged jobs (all repeats)", lambda f: f["backlogged_jobs"], shares)
        _common_rows(row, shares)
    counts = document["requests"]
    lines += ["", f"requests: {counts['sent']} sent, {counts['ok']} answered 200, {counts['completed_in_audit']} "
                  f"ended as completion in the audit, {counts['not_ok']} not 200"]
    if "goals" in document:
        lines.append("goals (equal weights, fair): " + ", ".join(
            f"{k} {'met' if v else 'NOT met' if v is not None else '-'}" for k, v in document["goals"].items()))
    return "\n".join(lines)
