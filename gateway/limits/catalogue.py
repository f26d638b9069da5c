"""The usage limits, declared once: what each is called, what it counts, how it refuses.

The policy (``policies/limits.rego``, ``usage_checks``), the decision parser
(``gateway.policy.decision``), the Redis counters and the 429 codes all read
the limits from here; ``tests/test_limits_catalogue.py`` fails when the Rego
side or the Lua scripts disagree with this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: What one request adds to a limit's counter: one request, or its tokens
#: (prompt plus ``max_tokens`` at admission; see ``gateway.limits.charge``).
Cost = Literal["request", "tokens"]

#: What decides when a refused request may retry. ``in_flight`` has no window:
#: the count is of requests still running.
Window = Literal["minute", "day", "month", "in_flight"]

#: How ``Retry-After`` is computed for each window (the Lua scripts and
#: ``retry_after_s`` in ``policies/limits.rego`` compute it this way, but
#: ``in_flight``'s, which the gateway estimates on the refusal).
RETRY_HINTS: dict[Window, str] = {
    "minute": "when enough of the sliding minute has passed to make room (1 to 60 s)",
    "day": "at the next 00:00 UTC",
    "month": "at 00:00 UTC on the first of next month",
    "in_flight": ("when one of the scope's requests in flight should end, as the gateway estimates it from the "
                  "model's queue and service time (gateway/limits/in_flight_wait.py; the policy says 1 s)"),
}


@dataclass(frozen=True)
class UsageLimit:
    """One limit a principal or a team may be held to."""

    name: str  # key in govgate_config.limits entries and in the ``limits`` obligation
    counter: str  # key in the policy input's ``usage.<scope>``, as ``UsageCounters.snapshot`` fills it
    cost: Cost
    window: Window
    code: str  # reason code of the refusal (all are 429s)

    @property
    def retry_hint(self) -> str:
        return RETRY_HINTS[self.window]


#: The in-flight limit's refusal code (its Retry-After is the gateway's estimate, not the policy's).
TOO_MANY_IN_FLIGHT = "too_many_in_flight"

#: In the order the Lua scripts keep the counters (``scripts.COUNTERS``).
USAGE_LIMITS: tuple[UsageLimit, ...] = (
    UsageLimit("requests_per_minute", "requests_last_minute", "request", "minute", "rate_limited"),
    UsageLimit("tokens_per_minute", "tokens_last_minute", "tokens", "minute", "rate_limited"),
    UsageLimit("tokens_per_day", "tokens_today", "tokens", "day", "budget_exceeded"),
    UsageLimit("tokens_per_month", "tokens_this_month", "tokens", "month", "budget_exceeded"),
    UsageLimit("in_flight", "in_flight", "request", "in_flight", TOO_MANY_IN_FLIGHT),
)

LIMIT_NAMES: tuple[str, ...] = tuple(limit.name for limit in USAGE_LIMITS)
COUNTER_NAMES: tuple[str, ...] = tuple(limit.counter for limit in USAGE_LIMITS)

#: The usage snapshot's one field that is not a counter: seconds until the
#: oldest entry leaves the minute window (the policy's ``retry_after_s``).
MINUTE_WINDOW_FREES_IN = "minute_window_frees_in_s"
#: Every field of ``input.usage.<scope>``, in snapshot order.
USAGE_FIELDS: tuple[str, ...] = (*COUNTER_NAMES, MINUTE_WINDOW_FREES_IN)

#: A 429 that is not a usage limit: the model's queue is full (set by the gateway after an allow).
QUEUE_FULL = "queue_full"
#: The usage limits' refusal codes.
LIMIT_CODES: frozenset[str] = frozenset(limit.code for limit in USAGE_LIMITS)
#: "Not now" codes: a 429 with Retry-After rather than a 403.
RETRYABLE_CODES: frozenset[str] = LIMIT_CODES | {QUEUE_FULL}
#: The same codes in catalogue order (for documents that list them).
RETRYABLE_CODES_IN_ORDER: tuple[str, ...] = (*dict.fromkeys(limit.code for limit in USAGE_LIMITS), QUEUE_FULL)
