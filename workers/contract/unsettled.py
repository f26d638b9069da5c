"""Requests whose end was recorded while no gateway listened: any gateway settles their usage.

A request's reservation (its in-flight slot, its prompt and ``max_tokens``
held against every budget) is settled by the gateway that waits for it. If
that gateway died (killed, or stopped before the job ran: the job itself
survives in the queue), the worker still runs the job and records its end,
but nobody settled: the slot stayed taken until its TTL and the whole
reservation stayed charged to the day and the month. So whoever records an
end that no gateway heard names the request here, and every gateway's sweep
(``gateway/requests/unsettled.py``) settles it from its terminal entry. A
settle is idempotent, so a name given twice, or for a request whose gateway
did settle (its pub/sub was only reconnecting), changes nothing.

Written by workers (``workers/replies.py``: a PUBLISH of the outcome that
reached no subscriber) and by whoever writes a kept entry late
(``workers/contract/pending_terminals.py``: a hand-over's fallback, written
because its gateway never recorded the end).

Each name goes on two lists. Since 2026-12-02 a request's usage record is a
field of the principal's counters hash; a gateway from before then looks for
it in a key of its own, finds none and drops the name as settled already. In
a rolling upgrade such a gateway popped the names of a newer gateway's
requests from the one list, and nobody settled them. So the names also go on
:data:`RECORDS_UNSETTLED_KEY`, which only newer gateways read; they pop both
(an older worker writes only :data:`UNSETTLED_KEY`), and a name settled twice
changes nothing.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

#: Redis list of request ids (LPUSH by the recorders, LPOP by gateways, older ones included).
UNSETTLED_KEY = "govgate:unsettled"
#: The same names, popped only by gateways that read a usage record in the principal's counters hash.
RECORDS_UNSETTLED_KEY = "govgate:unsettled:records"
#: Both, in the order a gateway pops them.
UNSETTLED_KEYS = (RECORDS_UNSETTLED_KEY, UNSETTLED_KEY)
#: The most ids kept: a flood of ends nobody settles (gateways down for long) cannot grow it without bound;
#: a slot whose id was trimmed still frees at its TTL.
MAX_KEPT = 100_000


def note_unsettled(client: redis.Redis, request_id: str) -> None:
    """Name ``request_id`` for the gateways to settle; never raises (the slot frees at its TTL anyway)."""
    try:
        with client.pipeline(transaction=False) as pipe:
            for key in UNSETTLED_KEYS:
                pipe.lpush(key, request_id)
                pipe.ltrim(key, 0, MAX_KEPT - 1)
            pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.warning("cannot name %s for a gateway to settle (its in-flight slot frees at its TTL): %s",
                    request_id, exc)
