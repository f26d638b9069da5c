"""Settling the tokens a request reserved once it ends (or giving them back).

A counter that cannot be updated is not raised: the request has ended
either way. A call that got no answer (Redis down, frozen, a lost
connection) is sent again in the background until Redis answers
(``UsageCounters.finish_later``; each call is idempotent, so one that did
run meanwhile counts once); without that, the in-flight slot stayed taken
until its TTL and the reserved tokens charged to the day. One that Redis
refused (out of memory, read-only) is logged: held tokens expire with their
day, in-flight ones with their TTL.

:class:`Settlements` is a gateway process's settling of its requests' ends (moved here from
``gateway/requests/outcome.py``): a handed-over output's tokens are known from its worker's report, so its
settlement is begun then, ahead of its end's record, and the end waits for that one.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.limits import CountersUnavailable, Reservation, UsageCounters
from gateway.requests.ticket import Ticket

log = logging.getLogger(__name__)


def _failed(counters: UsageCounters, reservation: Reservation, mode: str, tokens: int,
            exc: CountersUnavailable, what: str) -> None:
    if exc.answered:
        log.error("could not %s %s: %s", what, reservation.request_id, exc)
    else:
        counters.finish_later(reservation, mode, tokens, failed=exc)


async def release_reservation(counters: UsageCounters, reservation: Reservation) -> None:
    """Give back everything ``reservation`` holds: nothing was generated."""
    try:
        await counters.release(reservation)
    except CountersUnavailable as exc:
        _failed(counters, reservation, "released", 0, exc, "release the reservation of")


async def undo_reservation(counters: UsageCounters, reservation: Reservation) -> None:
    """Take back a reservation made with the snapshot, ahead of a decision that did not admit the request."""
    try:
        await counters.undo(reservation)
    except CountersUnavailable as exc:
        _failed(counters, reservation, "undone", 0, exc, "undo the early reservation of")


async def settle_reservation(counters: UsageCounters, reservation: Reservation | None, tokens: int | None) -> None:
    """Reconcile the reservation with the tokens really used (None or 0: nothing was generated)."""
    if reservation is None:
        return
    if not tokens:
        await release_reservation(counters, reservation)
        return
    try:
        await counters.settle(reservation, tokens)
    except CountersUnavailable as exc:
        _failed(counters, reservation, "settled", tokens, exc, "reconcile the usage of")


class Settlements:
    """Settles each request's reservation once, at its end or ahead of it (:meth:`settle_ahead`)."""

    def __init__(self, counters: UsageCounters, background: set[asyncio.Task]) -> None:
        self.counters = counters
        #: The runner's background tasks, which its ``aclose`` cancels: a settlement begun ahead is one.
        self._background = background
        #: Settlements begun ahead of their request's end (:meth:`settle_ahead`), by request id.
        self.ahead: dict[str, asyncio.Task[None]] = {}

    async def settle(self, ticket: Ticket, tokens: int | None) -> None:
        """Settle ``ticket``'s reservation to ``tokens`` (None: release it), unless a settlement was begun
        ahead (:meth:`settle_ahead`): then wait for that one, as Redis would ignore this one."""
        ahead = self.ahead.pop(ticket.request_id, None)
        if ahead is not None:
            await asyncio.shield(ahead)  # a cancelled request still leaves its usage settled
            return
        await settle_reservation(self.counters, ticket.reservation, tokens)

    def settle_ahead(self, ticket: Ticket, tokens: int | None) -> None:
        """Begin settling a handed-over output's ``tokens`` (its report's counts; None: unreadable) now,
        while its output is judged and recorded.

        Settling waited for the end's record, one Redis round trip after it on
        every such request's path; the tokens are known from the report. Every
        way that request ends charges what the report says (``HandedOver.record``
        returns its counts, also when the database refuses the entry), and a
        second settlement changes nothing in Redis, so the one begun here is
        the request's settlement: :meth:`settle` waits for it instead.
        """
        if tokens is None or ticket.reservation is None or ticket.request_id in self.ahead:
            return  # unreadable: the request's end settles as before
        task = asyncio.get_running_loop().create_task(
            settle_reservation(self.counters, ticket.reservation, tokens))
        self.ahead[ticket.request_id] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def forget(self, ticket: Ticket) -> None:
        """Drop a settlement begun ahead that no end waited for (it still runs to its end)."""
        self.ahead.pop(ticket.request_id, None)
