"""Server CPU per process role, read from ``/proc`` before and after a measured phase.

Why ``/proc`` and not ``psutil``: four numbers per process (utime, stime,
cutime, cstime) are all that is needed, and reading them directly keeps the
probe cheap enough not to disturb a phase.

A role is one process on its own (``own``: utime+stime only) or the
descendants of one process (``children``: each live descendant's whole
utime+stime+cutime+cstime, plus the parent's cutime+cstime for the
children it already reaped). Splitting a tree that way keeps every CPU tick
in exactly one role, also when a child dies or is replaced mid-phase: its
CPU moves from "live child" to "parent's cutime", both in the same role.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Role", "RoleProbe", "child_map", "cpu_ticks", "descendants"]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Indexes into the /proc/<pid>/stat fields after the command name.
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 1, 11, 12, 13, 14


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(own utime+stime, reaped children's cutime+cstime) of ``pid``; (0, 0) once it is gone."""
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0, 0
    return int(fields[_UTIME]) + int(fields[_STIME]), int(fields[_CUTIME]) + int(fields[_CSTIME])


def child_map() -> dict[int, list[int]]:
    """ppid -> pids for every process visible now (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[_PPID])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    """All live descendants of ``pid`` (not ``pid`` itself)."""
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@dataclass(frozen=True)
class Role:
    """One named share of a server's CPU: a process's own CPU, or everything below it."""

    name: str
    pid: int
    #: "own": the process alone; "children": its descendants, live and reaped; "tree": both.
    part: str = "tree"

    def ticks(self, children: Mapping[int, list[int]]) -> int:
        own, reaped = cpu_ticks(self.pid)
        below = reaped + sum(sum(cpu_ticks(p)) for p in descendants(self.pid, children))
        return {"own": own, "children": below, "tree": own + below}[self.part]


@dataclass
class RoleProbe:
    """CPU seconds per role between :meth:`start` and :meth:`stop` (one /proc scan each)."""

    roles: Iterable[Role]
    before: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roles = list(self.roles)

    def _read(self) -> dict[str, int]:
        children = child_map()
        totals: dict[str, int] = {}
        for role in self.roles:
            totals[role.name] = totals.get(role.name, 0) + role.ticks(children)
        return totals

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds each role spent since :meth:`start`."""
        after = self._read()
        return {name: (after[name] - self.before.get(name, 0)) / _TICKS_PER_S for name in after}
