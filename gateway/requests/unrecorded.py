"""Giving back reservations whose request was never recorded: their gateway died between the two.

Admission reserves (early, ahead of the policy's decision) before it writes
the request entry, and writes the entry before it queues the job. A gateway
killed in between (kill -9, an OOM kill under load) left a reservation that
no entry names (probe s57 D2): its in-flight slot held until its TTL (15
minutes), answering the principal's next requests 429 ``too_many_in_flight``
all that time, and its prompt and ``max_tokens`` charged to the day and the
month for good. The lost-request sweep never saw it, as it reads request
entries; nor did anything else.

So every :data:`LOOK_INTERVAL_S` one gateway (a Redis lock: replicas do not
repeat the look) reads the principals' request records for reservations
made more than :data:`UNRECORDED_AFTER_S` ago that are still held
(``UsageCounters.held_records``: a SCAN, off the request path, no cost per
request), and asks the audit store for their request entries. A reservation
whose request has no entry, or an entry that does not record it admitted
(its gateway died before it gave back the early reservation of a denied
request), is undone in its principal's and team's scopes: as if never made,
as a request that was never decided is. An admitted request's reservation
is left to its gateway, the lost-request sweep (``lost_requests.py``) and
the settling of requests ended without their gateway (``unsettled.py``).

Nothing is written to the audit trail: such a request was never decided,
nothing was served, and its client saw its connection drop. Each give-back
is logged (request id and principal) and counted in
``govgate_unrecorded_reservations_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import unquote

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditError, AuditStore
from gateway.limits import CountersUnavailable, HeldRecord, UsageCounters
from gateway.limits.admitting import ADMITTING_TTL_S
from gateway.observability.metrics import UNRECORDED_RESERVATIONS
from gateway.requests.lost_requests import was_admitted

log = logging.getLogger(__name__)

#: The least age of a reservation before its request's missing entry means its gateway died: an admission
#: that has not queued its request within ADMITTING_TTL_S has lost its place in the queue already; twice
#: that leaves room for clocks. Longer when the settings let an admission take longer (unrecorded_after_s).
UNRECORDED_AFTER_S = 2 * ADMITTING_TTL_S
#: Beyond the longest an admission may take between its reservation and its entry: clocks, Redis calls.
MARGIN_S = 60.0
#: Seconds between two looks (one gateway of all looks each time).
LOOK_INTERVAL_S = 30.0
#: The lock that lets one gateway look per interval.
LOOK_LOCK_KEY = "govgate:unrecorded:look"


def unrecorded_after_s(*, policy_wait_timeout_s: float, policy_timeout_s: float,
                       database_busy_timeout_s: float) -> float:
    """How old a reservation must be before a request entry that is still missing means its gateway died.

    The longest an admission may take from its (early) reservation to its
    entry: a wait for a free evaluator, the evaluation, and the entry's
    append, which waits up to the busy timeout behind a backlog and then up
    to the busy timeout itself; a margin on top, and never less than
    :data:`UNRECORDED_AFTER_S`. Reservations are undone on the looking
    gateway's figure: replicas whose settings differ (during a rolling
    change) should look with the longest.
    """
    longest = policy_wait_timeout_s + policy_timeout_s + 2 * database_busy_timeout_s
    return max(UNRECORDED_AFTER_S, longest + MARGIN_S)


async def give_back_unrecorded(counters: UsageCounters, audit: AuditStore, *, now: float | None = None,
                               after_s: float = UNRECORDED_AFTER_S) -> list[HeldRecord]:
    """One look: undo the reservations older than ``after_s`` whose request was not recorded admitted.

    Returns those given back. A page whose entries cannot be read is left
    for the next look (a database that is away says nothing about them).
    Raises :class:`CountersUnavailable` when Redis does not answer.
    """
    now = time.time() if now is None else now
    given: list[HeldRecord] = []
    async for page in counters.held_records(before=now - after_s):
        try:
            entries = await anyio.to_thread.run_sync(audit.request_entries, [held.request_id for held in page])
        except AuditError as exc:
            log.warning("cannot read the request entries of %d old reservations (looked at again later): %s",
                        len(page), exc)
            continue
        for held in page:
            entry = entries.get(held.request_id)
            if entry is not None and was_admitted(entry.body):
                continue
            if await counters.give_back_held(held, now=now):
                given.append(held)
                UNRECORDED_RESERVATIONS.inc()
                log.warning("gave back the reservation of request %s (principal %s, %d tokens, %.0f s old): "
                            "its request was %s", held.request_id, unquote(held.principal_key), held.tokens,
                            now - held.at, "never recorded" if entry is None else "recorded not admitted")
    return given


async def give_back_unrecorded_forever(redis: aioredis.Redis, counters: UsageCounters, audit: AuditStore, *,
                                       interval_s: float = LOOK_INTERVAL_S, after_s: float = UNRECORDED_AFTER_S,
                                       lock_key: str = LOOK_LOCK_KEY) -> None:
    """Look every ``interval_s`` until cancelled, when this gateway holds the look's lock for the interval.

    The lock expires with the interval (never released early), so a look
    runs at most once per interval whichever gateways run; one that dies
    holding it only delays the next look. A failed look is logged and tried
    again next time.
    """
    while True:
        try:
            if await redis.set(lock_key, "1", nx=True, px=max(1, round(interval_s * 900))):
                await give_back_unrecorded(counters, audit, after_s=after_s)
        except asyncio.CancelledError:
            raise
        except (CountersUnavailable, RedisError, OSError) as exc:
            log.warning("looking for reservations nobody recorded failed (tried again in %g s): %s",
                        interval_s, exc)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad look
            log.exception("looking for reservations nobody recorded failed")
        await asyncio.sleep(interval_s)
