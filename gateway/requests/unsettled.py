"""Settling the usage of requests whose end was recorded while their gateway was gone.

A gateway settles the reservations of the requests it waits for. One that
died (killed, or its jobs outlived it in the queue) leaves them held: the
in-flight slot until its TTL, the prompt and ``max_tokens`` charged to the
day and month for good. Whoever records such a request's end names it in
``UNSETTLED_KEYS`` (``workers/contract/unsettled.py``: two lists, one only
gateways of this layout read); every gateway pops the names every few
seconds and settles each to the tokens its terminal entry records (released
when it records none). Settling is idempotent, so a request its own gateway
settled too, or named on both lists, is not charged twice.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditError, AuditStore
from gateway.limits import CountersUnavailable, UsageCounters
from gateway.limits.charge import used_tokens
from gateway.requests.usage import settle_reservation
from workers.contract.unsettled import UNSETTLED_KEYS

log = logging.getLogger(__name__)

#: Seconds between two looks (an LPOP of each list when nothing waits).
SETTLE_INTERVAL_S = 2.0
#: Names taken per LPOP.
BATCH = 100


async def settle_unsettled(redis: aioredis.Redis, counters: UsageCounters, audit: AuditStore,
                           batch: int = BATCH) -> int:
    """Settle the requests named so far (up to ``batch`` from each list); return the most names taken
    from one list (``batch``: more may wait).

    A name whose terminal entry cannot be read now is dropped: its slot frees
    at its TTL. Raises ``RedisError``/``OSError`` when the names cannot be read.
    """
    popped = [await redis.lpop(key, batch) or [] for key in UNSETTLED_KEYS]
    names = dict.fromkeys(raw.decode() if isinstance(raw, bytes) else str(raw) for raw in sum(popped, []))
    for request_id in names:
        try:
            entry = await anyio.to_thread.run_sync(audit.terminal_for, request_id)
        except AuditError as exc:
            log.warning("cannot read the end of %s to settle its usage: %s", request_id, exc)
            continue
        if entry is None or entry.principal is None:
            continue
        try:
            reservation = await counters.held(request_id, entry.principal, entry.team)
        except CountersUnavailable as exc:
            log.warning("cannot settle the usage of %s: %s", request_id, exc)
            continue
        if reservation is None:  # its gateway settled it (or it expired)
            continue
        await settle_reservation(counters, reservation, used_tokens(entry.body.get("usage")) or None)
        log.info("settled the usage of %s, ended while no gateway waited for it", request_id)
    return max(len(taken) for taken in popped)


async def settle_unsettled_forever(redis: aioredis.Redis, counters: UsageCounters, audit: AuditStore,
                                   interval_s: float = SETTLE_INTERVAL_S) -> None:
    """Settle until cancelled; a failed round is logged and tried again next time."""
    while True:
        try:
            while await settle_unsettled(redis, counters, audit) == BATCH:
                pass  # a full batch: more may wait, go on at once
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("cannot read the requests to settle: %s", exc)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad round
            log.exception("settling requests ended without their gateway failed")
        await asyncio.sleep(interval_s)
