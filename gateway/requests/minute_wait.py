"""The ``Retry-After`` of a policy's ``rate_limited`` denial, from the counters rather than the policy.

The policy sees, per scope, the tokens and requests of the last minute and
when the *oldest* entry leaves the window (``minute_window_frees_in_s``):
for ``requests_per_minute`` that is when there is room, but for
``tokens_per_minute`` room comes only once enough tokens have left for
this request's tokens to fit, which depends on the request's size and on
every entry's age. A client told the policy's figure waited it and got a
second 429 (a probe: 40 s, then 20 s more). The counters' admit script
computes the true wait when it refuses; this module asks it, as
``too_many_in_flight``'s estimate replaces the policy's flat 1 s.

It costs no Redis call when the gateway's early reservation (made under
the same limits, before the policy decided) already refused: that reply
holds the wait (made under other limits, it says nothing of these: the
policy's figure stands). Without one, one admit call under the decision's
limits, its reservation undone at once if there turns out to be room (the
policy judged an older snapshot; its figure then stands). The request's
tokens are its prompt's plus the decision's ``max_tokens``, after the clamp;
an early reply for other tokens is not taken (its wait is theirs: the
requested 1000 of a request clamped to 256 never fit a limit of 400, and its
client was told 60 s; probe p2 #4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.limits import CountersReply, CountersUnavailable, Refusal, Reservation, UsageCounters
from gateway.policy import Decision
from gateway.requests.usage import undo_reservation

#: The refusal code of the minute windows (requests and tokens).
RATE_LIMITED = "rate_limited"


def needs_minute_wait(decision: Decision) -> bool:
    """A denial with a ``rate_limited`` reason, under limits the counters can be asked about."""
    return (not decision.allow and decision.obligations.limits is not None
            and any(reason.code == RATE_LIMITED for reason in decision.reasons))


async def with_minute_wait(decision: Decision, counters: UsageCounters, request_id: str, principal: str,
                           team: str | None, tokens: int, early: tuple[dict[str, Any], CountersReply] | None) -> Decision:
    """``decision`` with its ``rate_limited`` reasons' ``retry_after_s`` raised to the counters' wait.

    ``tokens``: what admitting the request would hold; ``early``: the early
    reservation's limits and reply, used when made under the decision's limits.
    A wait the counters cannot give (Redis down, room now, another limit the
    longest) leaves the policy's figure.
    """
    assert decision.obligations.limits is not None
    wanted = decision.obligations.limits.to_document()
    if early is not None:  # its reply is the counters' answer; under other limits it says nothing of these
        if early[0] != wanted:
            return decision
        outcome = early[1].outcome
    else:
        try:
            outcome = (await counters.admit(request_id, principal, team, wanted, tokens)).outcome
        except CountersUnavailable:
            return decision
        if isinstance(outcome, Reservation):
            await undo_reservation(counters, outcome)
            return decision
    if not isinstance(outcome, Refusal) or outcome.code != RATE_LIMITED:
        return decision
    wait = outcome.retry_after_s
    reasons = tuple(dataclasses.replace(r, retry_after_s=max(r.retry_after_s or 1, wait))
                    if r.code == RATE_LIMITED else r for r in decision.reasons)
    return dataclasses.replace(decision, reasons=reasons)
