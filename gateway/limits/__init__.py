"""Usage counters: rate windows, token budgets and in-flight counts in Redis.

Every gateway replica shares one Redis, and every check-and-record happens
inside one Lua script, so limits hold across replicas and cannot be raced.
"""

from gateway.limits.counters import (
    LIMIT_NAMES,
    CountersUnavailable,
    Refusal,
    Reservation,
    Scope,
    UsageCounters,
)

__all__ = ["LIMIT_NAMES", "CountersUnavailable", "Refusal", "Reservation", "Scope", "UsageCounters"]
