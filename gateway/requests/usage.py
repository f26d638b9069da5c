"""Settling the tokens a request reserved once it ends (or giving them back).

A counter that cannot be updated is not raised: the request has ended
either way. A call that got no answer (Redis down, frozen, a lost
connection) is sent again in the background until Redis answers
(``UsageCounters.finish_later``; each call is idempotent, so one that did
run meanwhile counts once); without that, the in-flight slot stayed taken
until its TTL and the reserved tokens charged to the day. One that Redis
refused (out of memory, read-only) is logged: held tokens expire with their
day, in-flight ones with their TTL.
"""

from __future__ import annotations

import logging

from gateway.limits import CountersUnavailable, Reservation, UsageCounters

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
