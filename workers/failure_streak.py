"""A pool process's run of failures of its own, and the mark it writes for gateways (:mod:`workers.contract.failing`).

Kept per process: under a prefork pool each process counts its own jobs,
and a setup fault (the payload key, the audit store) fails them all alike.
Redis is written only when the run reaches the threshold (and on each
further own failure), and once when a job completes after any own failure:
a worker whose jobs succeed sends nothing more. Best effort: a Redis that
cannot take the mark leaves ``/readyz`` as it was, and is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from workers.contract.failing import FAILING_AFTER, FAILING_KEY, FAILING_TTL_S, MARK_SCRIPT, OWN_FAILURES, reason_of
from workers.contract.jobs import STATUS_COMPLETED

log = logging.getLogger(__name__)


class FailureStreak:
    """Counts ``member``'s own failures in a row and marks it failing after ``after`` of them."""

    def __init__(self, client: redis.Redis, member: str, after: int = FAILING_AFTER,
                 ttl_s: int = FAILING_TTL_S) -> None:
        self._client = client
        self._member = member
        self._after = after
        self._ttl_s = ttl_s
        self._run = 0
        self._mark = client.register_script(MARK_SCRIPT)

    @property
    def run(self) -> int:
        """Own failures since the last completed job."""
        return self._run

    def ended(self, status: str, error: dict[str, Any] | None = None) -> None:
        """Note how a job ended: its status and, when it failed, its error (``code``, ``message``).

        A completed job ends a run; an own failure extends it; anything else
        (a cancel, a time limit, a failure the job brought) leaves it as it is.
        """
        code = str((error or {}).get("code", ""))
        if status == STATUS_COMPLETED:
            if self._run:
                self._run = 0
                self._send(lambda: self._client.hdel(FAILING_KEY, self._member), "clear")
            return
        if code not in OWN_FAILURES:
            return
        self._run += 1
        if self._run < self._after:
            return
        reason = reason_of(code, str((error or {}).get("message", "")))
        if self._run == self._after:
            log.error("%d jobs in a row failed %s: gateways' /readyz now counts this worker as not serving",
                      self._run, code)
        self._send(lambda: self._mark(keys=[FAILING_KEY], args=[self._member, self._ttl_s, reason]), "write")

    def _send(self, command: Any, what: str) -> None:
        try:
            command()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not %s this worker's failing mark: %s", what, exc)
