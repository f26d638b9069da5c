"""Ending accepted requests that nobody else will end: their gateway died before queueing them, or their job or
its end was lost with it or with Redis.

The request entry is written before the job is queued (nothing is queued
unaudited), so a gateway killed between the two leaves an accepted request
that no worker will ever see. Once ``request timeout + the broker's
visibility timeout + a margin`` has passed since its request entry, a job
that did reach the queue has been ended by a worker (a late job is recorded
as expired) or by its gateway; a request still without a terminal entry then
was most likely never queued, and every gateway's sweep ends it ``failed``
with code ``gateway_lost``. The same end comes to a request whose job, or
the end its worker kept for a database that refused it, Redis lost (a Redis
restarted empty, a host crash): its message says so much and no more, as
the sweep cannot tell which (probe s57 D3: it said "before queueing it" of
a stream whose client had received text). The database's unique terminal
constraint settles a race with another gateway or a late worker.

The wait is the request's own gateway's, which its request entry records
(``admission.lost_after_s``): a gateway whose request timeout is shorter
than another's used to sweep that one's requests while they still ran
(probe s57 D1: replicas whose settings differ during a rolling change). An
entry whose wait is longer than the sweeping gateway's is kept aside and
looked at again when its own wait is over; one that records none (written
before the field) is swept on the sweeping gateway's wait, as before.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

import anyio
import redis

from audit import AuditEntry, AuditError, AuditStore, DuplicateTerminalError
from gateway.limits import CountersUnavailable, UsageCounters
from workers.contract.queue_layout import VISIBILITY_MARGIN_S, visibility_timeout_s
from workers.contract.pending_terminals import PendingTerminals

log = logging.getLogger(__name__)

LOST_CODE = "gateway_lost"
LOST_MESSAGE = ("no end was recorded for the request within its time: its gateway stopped before queueing it, "
                "or its job or its end was lost with the gateway or with Redis")
#: Beyond the request timeout and the visibility timeout: the broker's restore
#: interval, a worker's last write, clocks that differ a little.
MARGIN_S = 15.0
#: Seconds between two sweeps (each reads only the entries that became old enough since the last).
SWEEP_INTERVAL_S = 5.0
#: Request entries read per query, and queries per sweep (a long look-back is read over several sweeps).
PAGE = 200
PAGES_PER_SWEEP = 25


def lost_after_s(request_timeout_s: float, generation_time_limit_s: float,
                 redelivery_margin_s: float = VISIBILITY_MARGIN_S) -> float:
    """How old an accepted request without a terminal entry must be before it counts as lost."""
    return request_timeout_s + visibility_timeout_s(generation_time_limit_s, redelivery_margin_s) + MARGIN_S


def was_admitted(body: Mapping[str, Any]) -> bool:
    """Whether a request entry's body records an allowed and admitted request (one that needs an end)."""
    decision = body.get("decision")
    admission = body.get("admission")
    return (isinstance(decision, Mapping) and decision.get("allow") is True
            and isinstance(admission, Mapping) and admission.get("admitted") is True)


def own_wait_s(body: Mapping[str, Any]) -> float | None:
    """The wait its own gateway gave an admitted request before it counts as lost (None: not recorded)."""
    admission = body.get("admission")
    value = admission.get("lost_after_s") if isinstance(admission, Mapping) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > 0:
        return float(value)
    return None


def lost_body() -> dict[str, Any]:
    """The ``failed`` entry's body: the gateway's usual error shape, and nothing of the prompt."""
    return {"error": {"code": LOST_CODE, "message": LOST_MESSAGE}}


class LostRequestSweep:
    """One gateway's look for lost requests; blocking (database, Redis): run :meth:`run_once` in a thread.

    Each entry is looked at once per process: a sweep reads the request
    entries between the last window's end and ``now - lost_after_s`` (the
    first one from ``now - lookback_s``), denied ones included, and a window
    left unfinished (an error, or more than ``PAGES_PER_SWEEP`` pages) is
    continued after the last entry handled.
    """

    def __init__(self, audit: AuditStore, pending: PendingTerminals | None, *, lost_after_s: float,
                 lookback_s: float, page: int = PAGE, pages_per_sweep: int = PAGES_PER_SWEEP) -> None:
        self._audit = audit
        self._pending = pending
        self._lost_after = timedelta(seconds=lost_after_s)
        self._lookback = timedelta(seconds=lookback_s)
        self._page = page
        self._pages_per_sweep = pages_per_sweep
        #: Entries created before this have been looked at.
        self._swept_until: datetime | None = None
        #: The window being read (after, before) and the last entry read of it.
        self._window: tuple[datetime, datetime] | None = None
        self._cursor: AuditEntry | None = None
        #: Entries read whose own wait (``admission.lost_after_s``) is longer than this sweep's, by the moment
        #: it is over: looked at again then (a process that restarts reads them again within ``lookback_s``).
        self._deferred: list[tuple[datetime, AuditEntry]] = []

    def run_once(self, now: datetime | None = None) -> list[AuditEntry]:
        """End the lost requests of the next window; return their request entries.

        Raises what the store or Redis raised; the next sweep then goes on
        with the same window after the last entry handled.
        """
        now = now or datetime.now(timezone.utc)
        ended = self._deferred_ends(now)
        if self._window is None:
            before = now - self._lost_after
            after = now - self._lookback
            if self._swept_until is not None:
                after = max(after, self._swept_until)
            if after >= before:
                return ended
            self._window, self._cursor = (after, before), None
        after, before = self._window
        for _ in range(self._pages_per_sweep):
            page = self._audit.requests_without_terminal(before=before, after=after, page_after=self._cursor,
                                                         limit=self._page)
            for entry in page:
                if was_admitted(entry.body):
                    due = self._due(entry)
                    if due > now:
                        self._deferred.append((due, entry))
                    elif self._end(entry):
                        ended.append(entry)
                self._cursor = entry
            if len(page) < self._page:
                self._swept_until, self._window, self._cursor = before, None, None
                break
        return ended

    def _due(self, request: AuditEntry) -> datetime:
        """When ``request`` counts as lost: after its own gateway's wait when that is longer than this one's."""
        own = own_wait_s(request.body)
        wait = timedelta(seconds=own) if own is not None and own > self._lost_after.total_seconds() \
            else self._lost_after
        return request.created_at + wait

    def _deferred_ends(self, now: datetime) -> list[AuditEntry]:
        """End the entries kept aside whose own wait is over and that still have no end."""
        due = [entry for moment, entry in self._deferred if moment <= now]
        if not due:
            return []
        self._deferred = [(moment, entry) for moment, entry in self._deferred if moment > now]
        ended = []
        for position, entry in enumerate(due):
            try:
                if self._audit.terminal_for(entry.request_id) is None and self._end(entry):
                    ended.append(entry)
            except BaseException:  # looked at again next sweep, with those not reached yet
                self._deferred.extend((self._due(left), left) for left in due[position:])
                raise
        return ended

    def _end(self, request: AuditEntry) -> bool:
        """Write the lost request's ``failed`` entry; False when its end was found elsewhere."""
        request_id = request.request_id
        # An end the database refused earlier waits in Redis and is the real one: write it instead.
        if self._pending is not None and self._pending.holds(request_id):
            self._pending.write_one(self._audit, request_id)
            return False
        try:
            self._audit.append("failed", request_id, principal=request.principal, team=request.team,
                               model=request.model, body=lost_body(), policy_revision=request.policy_revision)
        except DuplicateTerminalError:  # another gateway's sweep or a late worker ended it first
            return False
        log.warning("request %s was accepted and has no end after its time (never queued, or its job or end "
                    "was lost): recorded as failed (%s)", request_id, LOST_CODE)
        return True


async def release_lost(counters: UsageCounters, request: AuditEntry) -> None:
    """Give back what a lost request still holds: it never ran.

    Found from its record in Redis (kept two days). When that cannot be read
    the in-flight slot still expires with its TTL, but the reserved tokens
    stay counted in that day's and month's usage until those counters expire.
    """
    if request.principal is None:
        return
    try:
        reservation = await counters.held(request.request_id, request.principal, request.team)
        if reservation is not None:
            await counters.release(reservation)
    except CountersUnavailable as exc:
        log.error("could not release the reservation of lost request %s: %s", request.request_id, exc)


async def sweep_once(sweep: LostRequestSweep, counters: UsageCounters,
                     now: datetime | None = None) -> list[AuditEntry]:
    """One sweep: the blocking part in a thread, then the reservations of the requests it ended."""
    ended = await anyio.to_thread.run_sync(sweep.run_once, now)
    for request in ended:
        await release_lost(counters, request)
    return ended


async def sweep_lost_requests(sweep: LostRequestSweep, counters: UsageCounters,
                              interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep until cancelled; a failed sweep is logged and tried again next time.

    The database or Redis away (an outage, a restart) is said in one line with
    its reason, each sweep: a traceback every few seconds of an outage told an
    operator nothing more (``bench/soak.py --database postgres`` logged dozens
    per restart). Anything else keeps its traceback.
    """
    while True:
        try:
            await sweep_once(sweep, counters)
        except asyncio.CancelledError:
            raise
        except (AuditError, redis.RedisError, OSError) as exc:  # the next sweep continues the same window
            log.error("looking for lost requests failed (tried again in %g s): %s", interval_s, exc)
        except Exception:
            log.exception("looking for lost requests failed")
        await asyncio.sleep(interval_s)
