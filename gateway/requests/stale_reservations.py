"""Ending reservations held past their request: never recorded, or ended and never settled.

Admission reserves (early, ahead of the policy's decision) before it writes
the request entry, and writes the entry before it queues the job. A gateway
killed in between (kill -9, an OOM kill under load) left a reservation that
no entry names (probe s57 D2): its in-flight slot held until its TTL (15
minutes), answering the principal's next requests 429 ``too_many_in_flight``
all that time, and its prompt and ``max_tokens`` charged to the day and the
month for good. The lost-request sweep never saw it, as it reads request
entries; nor did anything else. A settle can be lost too after the request
ended: its gateway died before sending it and no end was named on the
unsettled lists (``unsettled.py``: a gateway that wrote the end itself), or
Redis lost it (a crash drops up to a second of its append-only file).

So every :data:`LOOK_INTERVAL_S` one gateway (a Redis lock: replicas do not
repeat the look) reads the principals' request records for reservations
made longer ago than an admission may take to record its request
(:func:`stale_after_s`) that are still held (``UsageCounters.held_records``:
a SCAN, off the request path, no cost per request), and asks the audit store
for their request entries:

- no entry, or one that does not record the request admitted (its gateway
  died before it gave back the early reservation of a denied request): the
  reservation is undone in its principal's and team's scopes, as if never
  made, as a request that was never decided is;
- an admitted request whose terminal entry is older than :data:`MARGIN_S`
  (its gateway settles within moments of its end): it is settled to the
  tokens that entry records, as ``unsettled.py`` settles one;
- an admitted request without an end: left to its gateway and to the
  lost-request sweep (``lost_requests.py``), which ends it and releases it.

Nothing is written to the audit trail: an unrecorded request was never
decided and nothing was served, and an ended one has its end. Each is
logged (request id and principal) and counted in
``govgate_stale_reservations_total`` by ``kind`` (``unrecorded``, ``unsettled``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditEntry, AuditError, AuditStore
from gateway.limits import CountersUnavailable, HeldRecord, UsageCounters
from gateway.limits.admitting import ADMITTING_TTL_S
from gateway.limits.charge import used_tokens
from gateway.observability.metrics import STALE_RESERVATIONS
from gateway.requests.lost_requests import was_admitted

log = logging.getLogger(__name__)

#: The least age of a reservation before its request's missing entry means its gateway died: an admission
#: that has not queued its request within ADMITTING_TTL_S has lost its place in the queue already; twice
#: that leaves room for clocks. Longer when the settings let an admission take longer (stale_after_s).
STALE_AFTER_S = 2 * ADMITTING_TTL_S
#: Beyond the longest an admission may take between its reservation and its entry (clocks, Redis calls);
#: and how old an end must be before its request's gateway counts as not settling it.
MARGIN_S = 60.0
#: Seconds between two looks (one gateway of all looks each time).
LOOK_INTERVAL_S = 30.0
#: The lock that lets one gateway look per interval.
LOOK_LOCK_KEY = "govgate:stale-reservations:look"
UNRECORDED, UNSETTLED = "unrecorded", "unsettled"


def stale_after_s(*, policy_wait_timeout_s: float, policy_timeout_s: float, database_busy_timeout_s: float) -> float:
    """How old a reservation must be before a request entry that is still missing means its gateway died.

    The longest an admission may take from its (early) reservation to its
    entry: a wait for a free evaluator, the evaluation, and the entry's
    append, which waits up to the busy timeout behind a backlog and then up
    to the busy timeout itself; a margin on top, and never less than
    :data:`STALE_AFTER_S`. Reservations are ended on the looking gateway's
    figure: replicas whose settings differ (during a rolling change) should
    look with the longest: each reservation's record keeps its own gateway's
    figure (``UsageCounters``'s ``record_wait_s``), and a look waits for the
    longer of the two.
    """
    longest = policy_wait_timeout_s + policy_timeout_s + 2 * database_busy_timeout_s
    return max(STALE_AFTER_S, longest + MARGIN_S)


def _ends(audit: AuditStore, request_ids: list[str]) -> tuple[dict[str, AuditEntry], dict[str, AuditEntry]]:
    """The request entries of ``request_ids`` that exist, and the ends of those admitted (in a thread)."""
    requests = audit.request_entries(request_ids)
    ends = {}
    for request_id, entry in requests.items():
        if was_admitted(entry.body) and (end := audit.terminal_for(request_id)) is not None:
            ends[request_id] = end
    return requests, ends


async def end_stale_reservations(counters: UsageCounters, audit: AuditStore, *, now: float | None = None,
                                 after_s: float = STALE_AFTER_S) -> list[tuple[str, HeldRecord]]:
    """One look: end the reservations older than ``after_s`` that no request of theirs will end.

    Returns each ended as (kind, record). A page whose entries cannot be read
    is left for the next look (a database that is away says nothing about
    them). Raises :class:`CountersUnavailable` when Redis does not answer.
    """
    now = time.time() if now is None else now
    settled_before = datetime.fromtimestamp(now, timezone.utc) - timedelta(seconds=MARGIN_S)
    ended: list[tuple[str, HeldRecord]] = []
    async for page in counters.held_records(before=now - after_s):
        # the reserving gateway's own figure when longer (probe s58 E F2: a replica with a short busy timeout
        # undid the reservation of another's admission that waited for the database, which was then served
        # uncounted)
        page = [held for held in page if now - held.at > (held.wait_s or 0)]
        if not page:
            continue
        try:
            requests, ends = await anyio.to_thread.run_sync(_ends, audit, [held.request_id for held in page])
        except AuditError as exc:
            log.warning("cannot read the entries of %d old reservations (looked at again later): %s", len(page), exc)
            continue
        for held in page:
            entry, end = requests.get(held.request_id), ends.get(held.request_id)
            if entry is None or not was_admitted(entry.body):
                kind, done = UNRECORDED, await counters.finish_held(held, "undone", now=now)
                how = "undone: its request was " + ("never recorded" if entry is None else "recorded not admitted")
            elif end is not None and end.created_at < settled_before:
                tokens = used_tokens(end.body.get("usage"))
                kind = UNSETTLED
                done = await counters.finish_held(held, "settled" if tokens else "released", tokens, now=now)
                how = f"settled to {tokens} tokens: its request ended {end.kind} and nobody settled it"
            else:
                continue  # running, or just ended: its gateway's; lost, the lost-request sweep's
            if done:
                ended.append((kind, held))
                STALE_RESERVATIONS.labels(kind).inc()
                log.warning("the reservation of request %s (principal %s, %d tokens, %.0f s old) was %s",
                            held.request_id, unquote(held.principal_key), held.tokens, now - held.at, how)
    return ended


async def end_stale_reservations_forever(redis: aioredis.Redis, counters: UsageCounters, audit: AuditStore, *,
                                         interval_s: float = LOOK_INTERVAL_S, after_s: float = STALE_AFTER_S,
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
                await end_stale_reservations(counters, audit, after_s=after_s)
        except asyncio.CancelledError:
            raise
        except (CountersUnavailable, RedisError, OSError) as exc:
            log.warning("looking for stale reservations failed (tried again in %g s): %s", interval_s, exc)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad look
            log.exception("looking for stale reservations failed")
        await asyncio.sleep(interval_s)
