"""When ``govgate up`` restarts a model's worker that exited, and when it stops trying.

A worker's main process can die while the stack serves (the OOM killer, a
crash in a model library, a watchdog that ends it on purpose); its model
then has no consumer and its requests only wait. The supervisor starts it
again, like systemd's ``Restart=`` with growing ``RestartSec`` steps, but a
worker that dies at every start must not spin: each restart waits twice as
long as the one before, and after :data:`MAX_RESTARTS` restarts within
:data:`WINDOW_S` the supervisor gives up on that model and keeps the rest
of the stack serving. Why these numbers: docs/architecture.md (govgate).
A start that something outside the worker refused (Redis refusing writes,
say on a full disk) is tried again with the same doubling waits, but is not
a restart: it does not count toward giving up, so the model comes back once
the trouble is over.

Pure: the caller passes the clock (``time.monotonic()``), so the policy is
tested without sleeping, and the supervisor keeps its loop non-blocking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: Wait before the first restart; a tiny model's worker is up again about two seconds later.
FIRST_BACKOFF_S = 0.5
#: Longest wait between two restarts (the doubling reaches it after the 7th restart in a row).
MAX_BACKOFF_S = 30.0
#: A worker that ran this long before it exited is not in a crash loop: the next wait starts over.
STABLE_AFTER_S = 60.0
#: Restarts allowed within :data:`WINDOW_S`; the next exit in that window gives the model up.
MAX_RESTARTS = 5
#: The window :data:`MAX_RESTARTS` is counted in (the waits before five restarts alone take 15.5 s).
WINDOW_S = 60.0


@dataclass(frozen=True)
class Restart:
    """Start the worker again after ``delay_s``; ``recent`` restarts (this one included) within the window."""

    delay_s: float
    recent: int


@dataclass(frozen=True)
class GiveUp:
    """Do not start the worker again: it was restarted ``recent`` times within the window already."""

    recent: int


class RestartPolicy:
    """The restart decisions for one model's worker, from its start and exit times."""

    def __init__(self, *, first_backoff_s: float = FIRST_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 stable_after_s: float = STABLE_AFTER_S, max_restarts: int = MAX_RESTARTS,
                 window_s: float = WINDOW_S) -> None:
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self.stable_after_s, self.max_restarts, self.window_s = stable_after_s, max_restarts, window_s
        self._next_backoff_s = first_backoff_s
        self._restarts: deque[float] = deque()  # when each restart was decided, oldest first
        self._started: float | None = None

    def started(self, now: float) -> None:
        """The worker was (re)started at ``now``."""
        self._started = now

    def exited(self, now: float) -> Restart | GiveUp:
        """The worker was found exited at ``now``: restart it (after how long), or give it up."""
        while self._restarts and now - self._restarts[0] >= self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return GiveUp(len(self._restarts))
        if self._started is not None and now - self._started >= self.stable_after_s:
            self._next_backoff_s = self.first_backoff_s
        delay = self._next_backoff_s
        self._next_backoff_s = min(delay * 2, self.max_backoff_s)
        self._restarts.append(now)
        return Restart(delay, len(self._restarts))

    def not_started(self, now: float) -> Restart:
        """A due start was refused from outside the worker (Redis refused a write): try again after the next wait.

        It waits like a restart (doubling up to :attr:`max_backoff_s`, so a long outage costs one attempt
        every 30 s) but is not counted toward giving up: no worker ran, so it says nothing of the model,
        and a model given up stays dead after the outage ends (h9 F2). ``recent`` is the restarts counted
        in the window, unchanged.
        """
        while self._restarts and now - self._restarts[0] >= self.window_s:
            self._restarts.popleft()
        delay = self._next_backoff_s
        self._next_backoff_s = min(delay * 2, self.max_backoff_s)
        return Restart(delay, len(self._restarts))
