"""The soak's report: outcomes (all, and each team's), the jobs that gave way, faults with their recovery, and
the verdict of every audit check."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench._figures import rounded
from bench.soak_audit import CHECKS, Check, Fault

#: The outcomes of an answer the client got whole.
SERVED_OUTCOMES = ("200", "200 stream [DONE]")


@dataclass
class SoakReport:
    """What :func:`run_soak` measured and found; ``ok`` is the verdict."""

    requests: int
    concurrency: int
    wall_s: float
    outcomes: Counter
    faults: list[Fault]
    checks: dict[str, Check]
    audit_entries: int = 0
    accepted: int = 0
    log_problems: dict[str, int] = field(default_factory=dict)
    #: Each team's outcomes (team name -> outcome -> count).
    teams: dict[str, Counter] = field(default_factory=dict)
    #: Fair jobs that gave way at their start during the run (``gw`` after less before); None: unread.
    gave_way: int | None = None
    #: The stack's ``GOVGATE_FAIR_GIVE_WAY``.
    give_way_on: bool = True

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.ok]

    def verdict(self) -> str:
        if self.ok:
            return (f"soak: PASS: {self.requests} requests of {len(self.teams)} teams, {len(self.faults)} faults, "
                    f"{self.accepted} accepted, {self._gave_way_text()}, every audit check holds")
        return f"soak: FAIL: {', '.join(self.failed_checks)} ({self._gave_way_text()})"

    def _gave_way_text(self) -> str:
        if not self.give_way_on:
            return "give-way off"
        return f"{'?' if self.gave_way is None else self.gave_way} jobs gave way"

    def served(self, team: str) -> int:
        """How many of ``team``'s requests were served (a 200, or a stream ending with ``[DONE]``)."""
        return sum(self.teams.get(team, Counter())[outcome] for outcome in SERVED_OUTCOMES)

    def render(self) -> str:
        """The figures as aligned text, ending with the verdict line."""
        lines = [f"{self.requests} requests at concurrency {self.concurrency} in {self.wall_s:.1f}s "
                 f"({self.requests / self.wall_s:.1f} req/s), {os.cpu_count()} CPUs", "", "outcomes:"]
        for outcome, count in sorted(self.outcomes.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>7}  {outcome}")
        lines += ["", "teams:        requests   served  other outcomes"]
        for team, outcomes in self.teams.items():
            others = ", ".join(f"{count} {outcome}" for outcome, count in
                               sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
                               if outcome not in SERVED_OUTCOMES)
            lines.append(f"  {team:<10}{sum(outcomes.values()):>10}{self.served(team):>9}  {others or '-'}")
        gave_way = "unknown (Redis did not answer)" if self.gave_way is None else str(self.gave_way)
        lines.append(f"jobs that gave way at their start: {gave_way}"
                     + ("" if self.give_way_on else " (GOVGATE_FAIR_GIVE_WAY=0)"))
        lines += ["", "faults:                at s    restart s   recovery s  detail"]
        start = self.faults[0].at if self.faults else 0.0
        for fault in self.faults:
            lines.append(f"  {fault.kind:<18}{fault.at - start:>8.1f}{_cell(fault.restart_s):>13}"
                         f"{_cell(fault.recovery_s, 'never'):>13}  {fault.detail}")
        lines += ["", f"audit: {self.audit_entries} entries, {self.accepted} accepted requests"]
        for name, check in self.checks.items():
            mark = "ok  " if check.ok else "FAIL"
            near = ", ".join(f"{kind} {count}" for kind, count in check.by_fault.most_common())
            lines.append(f"  {mark} {name}: {CHECKS[name]}"
                         + ("" if check.ok else f" ({check.failures} failures{': ' + near if near else ''})"))
            lines.extend(f"         e.g. {example}" for example in check.examples)
        if self.log_problems:
            lines += ["", "log lines worth a look: " + ", ".join(
                f"{name} {count}" for name, count in sorted(self.log_problems.items()))]
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def to_document(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 2),
            "outcomes": dict(self.outcomes), "accepted": self.accepted, "audit_entries": self.audit_entries,
            "faults": [{"kind": f.kind, "detail": f.detail, "restart_s": rounded(f.restart_s, 2),
                        "recovery_s": rounded(f.recovery_s, 2)} for f in self.faults],
            "checks": {name: {"ok": c.ok, "failures": c.failures, "examples": c.examples,
                              "by_fault": dict(c.by_fault)}
                       for name, c in self.checks.items()},
            "log_problems": self.log_problems, "ok": self.ok,
            "teams": {team: {"requests": sum(outcomes.values()), "served": self.served(team),
                             "outcomes": dict(outcomes)} for team, outcomes in self.teams.items()},
            "gave_way": self.gave_way, "give_way_on": self.give_way_on,
        }


def _cell(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.1f}"
