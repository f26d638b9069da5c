"""How many requests a gateway admits at once, and in what order the others wait: by team share.

Admission (usage counters, decision, reservation, request entry) passes
through lines that serve whoever came first: redis-py's connection pool, the
event loop's ready queue, the audit writer's group commit. A burst of 200
from one team filled them, so another team's request waited behind all of it
before it could be queued for a worker (bench/fairness.py; docs/architecture.md,
"One worker shared by teams"). The gate lets ``size`` requests through at a
time and lines the rest up per team in a :class:`FairSlots` (start-time fair
queueing over the policy's team shares, FIFO within a team), so the FIFO lines
behind it stay short and a light team's request is next, not 200th.

The gate only orders; it never refuses. A request that waited ``wait_s``
(the policy's wait bound) goes on without a slot, to the bounded waits
behind it as before the gate existed, so a stuck admission cannot hold
others longer than that.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator, Callable

from gateway.policy.fair_line import FairSlots, Team

log = logging.getLogger(__name__)

#: At most one warning this often when requests go on without a slot.
_WARN_EVERY_S = 60.0


class AdmissionGate:
    """``size`` admissions at once; the others wait by team, at most ``wait_s``."""

    def __init__(self, size: int, wait_s: float, weight_of: Callable[[Team], float] | None = None) -> None:
        self._slots = FairSlots(size, weight_of)
        self._wait_s = wait_s
        self._warned_at = float("-inf")
        #: Requests that went on without a slot after waiting ``wait_s`` (for operators and tests).
        self.bypassed = 0

    @property
    def free(self) -> int:
        return self._slots.free

    def waiting(self) -> dict[Team, int]:
        """Requests waiting at the gate, per team."""
        return self._slots.waiting()

    async def enter(self, team: Team) -> bool:
        """Take a slot, waiting in ``team``'s line if none is free; False: went on without one (waited too long).

        Pair with :meth:`leave` when True. Not a context manager: this runs
        for every request, and a generator-based one costs five times more.
        """
        if await self._slots.take(team, self._wait_s):
            return True
        self._note_bypass()
        return False

    def leave(self) -> None:
        """Give back the slot :meth:`enter` took."""
        self._slots.give()

    @contextlib.asynccontextmanager
    async def admitting(self, team: Team) -> AsyncIterator[None]:
        """:meth:`enter` and :meth:`leave` around a block."""
        held = await self.enter(team)
        try:
            yield
        finally:
            if held:
                self.leave()

    def _note_bypass(self) -> None:
        self.bypassed += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("admission gate: a request waited %gs for one of %d slots and went on without one "
                        "(%d so far); admissions are slower than requests arrive", self._wait_s, self._slots.size,
                        self.bypassed)
