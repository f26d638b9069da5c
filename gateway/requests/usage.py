"""Settling the tokens a request reserved once it ends (or giving them back).

A counter that cannot be updated is logged, not raised: the request has
ended either way, and held tokens expire with their day, in-flight ones with
their TTL.
"""

from __future__ import annotations

import logging

from gateway.limits import CountersUnavailable, Reservation, UsageCounters

log = logging.getLogger(__name__)


async def release_reservation(counters: UsageCounters, reservation: Reservation) -> None:
    """Give back everything ``reservation`` holds: nothing was generated."""
    try:
        await counters.release(reservation)
    except CountersUnavailable as exc:
        log.error("could not release reservation of %s: %s", reservation.request_id, exc)


async def undo_reservation(counters: UsageCounters, reservation: Reservation) -> None:
    """Take back a reservation made with the snapshot, ahead of a decision that did not admit the request."""
    try:
        await counters.undo(reservation)
    except CountersUnavailable as exc:
        log.error("could not undo the early reservation of %s: %s", reservation.request_id, exc)


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
        log.error("could not reconcile usage of %s: %s", reservation.request_id, exc)
