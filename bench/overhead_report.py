"""What ``bench/overhead.py`` measured (one round of one side) and how it is reported.

Each side runs ``rounds`` times, interleaved with the other; the figures of
a side come from its better round, because noise from the rest of the
machine (other benches, a build) only ever makes a round worse:

* CPU, req/s, the per-process split and the Redis commands all come from
  the c=32 phase with the least whole-tree CPU per request (one coherent
  round, not a mix);
* the c=1 p50 is the lowest of the rounds' c=1 p50s;
* ``non_2xx`` adds up every c=32 phase of every round: one failure anywhere
  counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench._figures import ratio, rounded, table_row
from bench._load import Phase

__all__ = ["GOVGATE_ROLES", "SideRun", "report", "side_figures", "table"]

#: The govgate processes, in table order: the uvicorn process itself, its policy
#: evaluator children, the Celery main process, its pool children, Redis.
GOVGATE_ROLES = ("gateway", "evaluators", "worker_main", "worker_pool", "redis")
#: The targets the Performance issue sets; printed beside the ratios, never asserted.
TARGETS = {"cpu": 12.0, "c1_p50": 8.0}


@dataclass
class SideRun:
    """One round of one side: the c=32 phase with its CPU and Redis commands, then the c=1 phase."""

    c32: Phase
    #: Role -> CPU seconds during the c=32 phase.
    cpu_s: dict[str, float]
    c1: Phase
    #: Command -> calls during the c=32 phase; None for a side without Redis.
    commands: dict[str, int] | None = None
    #: CPU seconds the other (idle) side's processes spent meanwhile: shows how quiet "idle" was.
    other_side_cpu_s: float = 0.0

    @property
    def other_side_cpu_pct(self) -> float:
        """The idle side's CPU during the c=32 phase, in percent of one core."""
        return self.other_side_cpu_s * 100 / self.c32.wall_s if self.c32.wall_s > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return sum(self.cpu_s.values()) * 1000 / max(self.c32.requests, 1)


def _per_request(values: dict[str, float], requests: int, scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    return {name: round(value * scale / max(requests, 1), digits) for name, value in values.items()}


def side_figures(runs: list[SideRun]) -> dict[str, Any]:
    """One side's figures from its rounds (see the module docstring for which round gives what)."""
    best = min(runs, key=lambda run: run.cpu_ms_per_request)
    c1_p50s = [p for p in (run.c1.percentile(50) for run in runs) if p is not None]
    statuses: Counter = Counter()
    for run in runs:
        statuses.update(run.c32.statuses)
    figures: dict[str, Any] = {
        "cpu_ms_per_request": round(best.cpu_ms_per_request, 3),
        "c1_p50_ms": rounded(min(c1_p50s) if c1_p50s else None, 3),
        "rps": round(best.c32.rps, 1),
        "non_2xx": sum(run.c32.non_2xx for run in runs),
        "by_process": _per_request(best.cpu_s, best.c32.requests, scale=1000),
        "client_cpu_ms_per_request": round(best.c32.client_cpu_s * 1000 / max(best.c32.requests, 1), 3),
        "c32_p50_ms": rounded(best.c32.percentile(50), 2),
        "c32_p99_ms": rounded(best.c32.percentile(99), 2),
        "non_2xx_c1": sum(run.c1.non_2xx for run in runs),
        "statuses": dict(sorted(statuses.items())),
        "rounds": [{"cpu_ms_per_request": round(run.cpu_ms_per_request, 3), "rps": round(run.c32.rps, 1),
                    "c1_p50_ms": rounded(run.c1.percentile(50), 3),
                    "client_cpu_ms_per_request": round(run.c32.client_cpu_s * 1000 / max(run.c32.requests, 1), 3),
                    "other_side_idle_cpu_pct": round(run.other_side_cpu_pct, 1)} for run in runs],
    }
    if best.commands is not None:
        figures["redis_commands_per_request"] = round(sum(best.commands.values()) / max(best.c32.requests, 1), 2)
        figures["redis_commands"] = _per_request(best.commands, best.c32.requests, digits=2)
    return figures


def report(gov_runs: list[SideRun], bare_runs: list[SideRun], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON document ``--json`` writes: ``bare``, ``govgate``, ``ratios`` (and what was run)."""
    gov, bare = side_figures(gov_runs), side_figures(bare_runs)
    return {
        "bare": bare,
        "govgate": gov,
        "ratios": {
            "cpu": ratio(gov["cpu_ms_per_request"], bare["cpu_ms_per_request"]),
            "c1_p50": ratio(gov["c1_p50_ms"], bare["c1_p50_ms"]),
            "rps": ratio(gov["rps"], bare["rps"]),
        },
        "settings": settings,
    }


_LABEL, _CELL = 22, 11


def _row(label: str, cells: list[Any], suffix: str = "") -> str:
    return table_row(label, cells, (_LABEL, _CELL), suffix)


def table(document: dict[str, Any]) -> str:
    """Three aligned blocks: the headline figures, govgate's CPU by process, its Redis commands."""
    gov, bare, ratios = document["govgate"], document["bare"], document["ratios"]
    lines = [_row("", ["CPU ms/req", "c=1 p50 ms", "req/s", "c=32 p50", "c=32 p99", "non-2xx", "client ms"])]
    for name, side in (("bare litestar", bare), ("govgate", gov)):
        lines.append(_row(name, [side["cpu_ms_per_request"], side["c1_p50_ms"], side["rps"], side["c32_p50_ms"],
                                 side["c32_p99_ms"], side["non_2xx"], side["client_cpu_ms_per_request"]]))
    lines.append(_row("govgate / bare", [ratios["cpu"], ratios["c1_p50"], ratios["rps"]], suffix="x"))
    lines.append(_row("issue target", [f"<={TARGETS['cpu']:g}x", f"<={TARGETS['c1_p50']:g}x", None, None, None, 0]))
    lines.append("")
    lines.append("govgate CPU ms per request by process (c=32): "
                 + ", ".join(f"{name} {value}" for name, value in gov["by_process"].items()))
    if "redis_commands" in gov:
        top = list(gov["redis_commands"].items())
        shown = ", ".join(f"{name} {count}" for name, count in top[:12])
        more = f", … {len(top) - 12} more" if len(top) > 12 else ""
        lines.append(f"redis commands per request: {gov['redis_commands_per_request']} ({shown}{more})")
    lines.append("")
    lines.append(_row("each round", ["CPU ms/req", "c=1 p50 ms", "req/s", "client ms", "idle side"]))
    for name, side in (("bare litestar", bare), ("govgate", gov)):
        for number, r in enumerate(side["rounds"], 1):
            lines.append(_row(f"{name} {number}", [r["cpu_ms_per_request"], r["c1_p50_ms"], r["rps"],
                                                   r["client_cpu_ms_per_request"],
                                                   f"{r['other_side_idle_cpu_pct']}%"]))
    lines.append("client ms: the load client's CPU per request; idle side: the other side's CPU during this "
                 "c=32 phase, in % of one core")
    for name, side in (("bare litestar", bare), ("govgate", gov)):
        if side["non_2xx"] or side["non_2xx_c1"]:
            lines.append(f"{name}: outcomes of the c=32 phases {side['statuses']}, non-2xx at c=1 {side['non_2xx_c1']}")
    return "\n".join(lines)
