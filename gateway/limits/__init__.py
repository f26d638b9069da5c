"""Usage limits: the catalogue of limits, and their counters in Redis.

Every gateway replica shares one Redis, and every check-and-record happens
inside one Lua script, so limits hold across replicas and cannot be raced.
"""

from typing import TYPE_CHECKING, Any

from gateway.limits.catalogue import LIMIT_NAMES, RETRYABLE_CODES, USAGE_LIMITS, UsageLimit

if TYPE_CHECKING:
    from gateway.limits.counters import (CountersReply, CountersUnavailable, HeldRecord, QueueAtLimit, QueueCheck,
                                         Refusal, Reservation, Scope, TeamPlaces, UsageCounters)

# Imported on first use: the decision parser reads the catalogue in the
# policy's evaluator processes, which must not pay for redis (~100 ms).
_COUNTERS_API = {"CountersReply", "CountersUnavailable", "HeldRecord", "QueueAtLimit", "QueueCheck", "Refusal",
                 "Reservation", "Scope", "TeamPlaces", "UsageCounters"}


def __getattr__(name: str) -> Any:
    if name in _COUNTERS_API:
        from gateway.limits import counters

        return getattr(counters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LIMIT_NAMES",
    "RETRYABLE_CODES",
    "USAGE_LIMITS",
    "CountersReply",
    "CountersUnavailable",
    "HeldRecord",
    "QueueAtLimit",
    "QueueCheck",
    "Refusal",
    "Reservation",
    "Scope",
    "TeamPlaces",
    "UsageCounters",
    "UsageLimit",
]
