"""A waiting line that serves teams by weight: who gets the next free policy evaluator (or OPA connection).

A burst from one team used to fill a first-come-first-served line, and every
other team's request waited behind all of it in the gateway before it could
even be queued for a worker (bench/fairness.py). This line keeps a FIFO per
team and picks the team by start-time fair queueing, the same rule the
workers use for jobs (docs/architecture.md, "Fair share"): serving team t
starts it at ``S = max(V, F_t)``, then ``F_t = S + 1 / w_t`` and ``V = S``;
the team served next is the one with the smallest ``max(V, F_t)``, ties
going to the team whose first waiter came first. A backlogged team of
weight 3 is served three times per turn of a weight-1 team, a team that was
idle starts at ``V`` (no credit for idling), so a team that appears behind a
backlog is served next. Every turn costs the same (``1 / w``): decisions
take about the same time, and the line must not cost measurable CPU.

The line holds futures and never resolves them; the owner (the evaluator
pool, the OPA engine) does, and bounds the wait with its own timer. A
waiter that is done when its turn comes (timed out, cancelled) is dropped
then and its team is not charged.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["FairLine", "Team"]

T = TypeVar("T")
#: A principal's team as the policy input has it (``principal.team``); None for a principal without one.
Team = str | None


class _Queue(Generic[T]):
    """One team's waiters in arrival order, its weight and its finish tag."""

    __slots__ = ("finish", "waiters", "weight")

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.finish = 0.0
        self.waiters: deque[tuple[int, asyncio.Future[T]]] = deque()


class FairLine(Generic[T]):
    """Futures waiting for something scarce, grouped by team and served by weight (FIFO within a team).

    ``weight_of(team)`` gives a team's weight when the team starts waiting
    with no waiter of its own ahead (so new shares apply from a team's next
    busy spell); a weight that is not a positive number counts as 1.
    """

    def __init__(self, weight_of: Callable[[Team], float] | None = None) -> None:
        self._weight_of = weight_of
        self._teams: dict[Team, _Queue[T]] = {}
        self._virtual = 0.0  # V: the start tag of the turn served last
        self._arrivals = itertools.count()

    def push(self, team: Team, waiter: asyncio.Future[T]) -> None:
        """Put ``waiter`` at the end of ``team``'s line."""
        queue = self._teams.get(team)
        if queue is None:
            queue = self._teams[team] = _Queue(self._weight(team))
        elif not queue.waiters:  # back after its line ran empty: a reload may have changed its share
            queue.weight = self._weight(team)
        queue.waiters.append((next(self._arrivals), waiter))

    def pop(self) -> asyncio.Future[T] | None:
        """The waiter whose turn it is (not done), charged to its team; None when no one waits."""
        while True:
            chosen: _Queue[T] | None = None
            chosen_key = (math.inf, 0)
            for queue in self._teams.values():
                if queue.waiters:
                    key = (max(self._virtual, queue.finish), queue.waiters[0][0])
                    if key < chosen_key:
                        chosen, chosen_key = queue, key
            if chosen is None:
                self._prune()
                return None
            _, waiter = chosen.waiters.popleft()
            if waiter.done():  # timed out or cancelled while waiting: not a turn
                continue
            start = chosen_key[0]
            chosen.finish = start + 1.0 / chosen.weight
            self._virtual = start
            self._prune()
            return waiter

    def drain(self) -> Iterator[asyncio.Future[T]]:
        """Every waiter still waiting, the line emptied (the owner is closing)."""
        teams, self._teams = self._teams, {}
        self._virtual = 0.0
        for queue in teams.values():
            for _, waiter in queue.waiters:
                if not waiter.done():
                    yield waiter

    def waiting(self) -> dict[Team, int]:
        """Live waiters per team (for operators and tests)."""
        counts = {team: sum(not w.done() for _, w in queue.waiters) for team, queue in self._teams.items()}
        return {team: n for team, n in counts.items() if n}

    def __len__(self) -> int:
        return sum(self.waiting().values())

    def _weight(self, team: Team) -> float:
        weight = self._weight_of(team) if self._weight_of is not None else 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            return 1.0
        return float(weight)

    def _prune(self) -> None:
        """Forget teams with no waiters whose tag ``V`` has passed: coming back, they would start at ``V`` anyway."""
        idle = [team for team, queue in self._teams.items() if not queue.waiters and queue.finish <= self._virtual]
        for team in idle:
            del self._teams[team]
        if not self._teams:
            self._virtual = 0.0


class FairSlots:
    """``size`` slots lent out one at a time; when none is free, borrowers wait in a :class:`FairLine`.

    A fair semaphore with a bounded wait: :meth:`take` is False when no slot
    came within the bound. A slot handed to a borrower that was cancelled in
    that moment goes to the next one.
    """

    def __init__(self, size: int, weight_of: Callable[[Team], float] | None = None) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._free = size
        self._line: FairLine[bool] = FairLine(weight_of)

    @property
    def free(self) -> int:
        return self._free

    def waiting(self) -> dict[Team, int]:
        """Borrowers waiting for a slot, per team."""
        return self._line.waiting()

    async def take(self, team: Team, timeout_s: float) -> bool:
        """A slot (True), waiting in ``team``'s line when all are taken; False after ``timeout_s``."""
        if self._free > 0:
            self._free -= 1
            return True
        if timeout_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[bool] = loop.create_future()
        self._line.push(team, handed)
        timer = loop.call_later(timeout_s, _settle, handed, False)
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled() and handed.result():
                self.give()  # handed over just as the borrower was cancelled: the next one's
            raise
        finally:
            timer.cancel()

    def give(self) -> None:
        """Give back a slot :meth:`take` lent: to the borrower whose turn it is, or free."""
        waiter = self._line.pop()
        if waiter is not None:
            waiter.set_result(True)
        else:
            self._free += 1


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
