"""What a forced stop (a second Ctrl-C or SIGTERM) still does before the gateway exits: the closing checkpoint.

uvicorn's forced exit skips the app's lifespan shutdown altogether, and with
it everything the gateway closes there. Most of that the process's exit
closes anyway (sockets, connections). The closing audit checkpoint it does
not: the entries of the stop's last seconds (the ended requests' ``cancelled``
and ``rejected``) stayed unsigned, and ``govgate audit verify`` run while the
gateway was down reported them as tampering once older than its age limit
(probe q1 F5), for a routine second Ctrl-C.

So the app registers here what must still run (:meth:`ForcedStop.add`), and
``gateway/serving.py`` runs it once, bounded by :data:`FORCED_STOP_S` in all:
a forced stop stays quick, and one whose database hangs exits without the
checkpoint (logged) rather than waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Final

log = logging.getLogger(__name__)

#: The longest the calls of a forced stop may take together (a checkpoint is one row: milliseconds).
FORCED_STOP_S: Final = 3.0

#: One call: it gets the seconds it may take and should keep within them (it is cancelled after).
Call = Callable[[float], Awaitable[None]]


class ForcedStop:
    """The calls a forced stop still makes, registered by the app while it runs."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[str, Call]] = {}
        self._next = 0

    def add(self, name: str, call: Call) -> Callable[[], None]:
        """Register ``call`` (``name`` is for the log); the returned function removes it again (at a clean
        stop the app's own shutdown does the work)."""
        token = self._next
        self._next += 1
        self._calls[token] = (name, call)
        return lambda: self._calls.pop(token, None) and None

    async def run(self, within_s: float = FORCED_STOP_S) -> None:
        """Make every registered call once, oldest first, all within ``within_s``; failures are logged."""
        deadline = time.monotonic() + within_s
        calls, self._calls = list(self._calls.values()), {}
        for name, call in calls:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("forced stop: no time left for %s", name)
                continue
            try:
                await asyncio.wait_for(call(left), left)
            except asyncio.TimeoutError:
                log.error("forced stop: %s did not finish within %.1fs", name, left)
            except Exception:  # noqa: BLE001 - a forced stop goes on whatever one call does
                log.exception("forced stop: %s failed", name)
