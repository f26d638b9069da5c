"""A request whose admission took so long that another gateway may have taken its reservation for stale.

The stale-reservation look (``gateway/requests/stale_reservations.py``)
undoes a reservation whose request has no entry once it is older than its
gateway's own wait (``UsageCounters``'s ``record_wait_s``, kept in the
record). An admission that takes longer still, its gateway paused (SIGSTOP,
a frozen VM) or its entry's write held past the busy timeout's bound, then
records and queues a request that holds nothing: it was served uncounted
(probe s58 E F2: three requests served, one counted).

So an admission slower than half that wait asks, once its entry is
written, whether its reservation is still held: one ``HGET``, only on such
rare slow admissions, none on the others. One that is gone is not served:
its end is recorded ``failed`` (``usage_unavailable``) and the client gets
503 ``usage_unavailable``, to try again, as when the counters cannot be
reached. A Redis that cannot answer leaves the request to go on: its push
needs Redis too, and fails closed there.
"""

from __future__ import annotations

import logging
import time

from gateway.api_errors import ApiError
from gateway.limits import CountersUnavailable, UsageCounters
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket

log = logging.getLogger(__name__)

CODE = "usage_unavailable"
MESSAGE = ("The request's admission took too long (the gateway was paused, or the audit database slow), and its "
           "usage reservation was given back meanwhile, so the request was refused; nothing was generated. "
           "Try again.")


async def refuse_if_given_back(counters: UsageCounters, request_log: RequestLog, ticket: Ticket) -> None:
    """Raise 503 ``usage_unavailable`` (its end recorded ``failed``) when ``ticket``'s reservation was
    given back while its admission took more than half its gateway's wait; a no-op otherwise."""
    reservation, wait_s = ticket.reservation, counters.record_wait_s
    if reservation is None or wait_s is None or time.time() - reservation.at <= wait_s / 2:
        return
    try:
        held = await counters.held(ticket.request_id, ticket.principal.id, ticket.principal.team)
    except CountersUnavailable as exc:
        log.warning("cannot tell whether the slow admission of %s still holds its reservation: %s",
                    ticket.request_id, exc)
        return
    if held is not None:
        return
    log.warning("request %s took %.0f s to admit, and its reservation was given back meanwhile: refused",
                ticket.request_id, time.time() - reservation.at)
    await request_log.end(ticket, "failed", {"error": {"code": CODE, "message": MESSAGE}})
    raise ApiError(503, CODE, MESSAGE, request_id=ticket.request_id)
