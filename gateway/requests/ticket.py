"""The ticket of an admitted request: what the steps after the queue need to know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.auth import Principal
from gateway.limits import QueueCheck, Reservation
from gateway.policy import Decision
from workers.contract.jobs import GenerateJob


@dataclass(frozen=True)
class Ticket:
    """An admitted request: recorded, allowed, ready to be queued."""

    request_id: str
    principal: Principal
    model: str
    #: Unix time (s) the request was decided: the ``created`` of its responses.
    created: int
    job: GenerateJob
    #: The policy's ``priority`` obligation (0 first, 9 last; None: the queue's default).
    priority: int | None = None
    #: A stream ends with a usage chunk.
    include_usage: bool = False
    #: Tokens held against the principal's and team's limits until the request ends.
    reservation: Reservation | None = None
    #: The request's policy input without its prompt, and the decision that admitted it: the context
    #: the output rules judge the output in (``gateway/requests/output_rules.py``).
    policy_input: dict[str, Any] | None = None
    decision: Decision | None = None
    #: The queue check its push makes, taking its place in the same step (None: its admission took its
    #: place already). Set when its reservation was made early, before the policy decided, and so took no
    #: place: a request the policy denies must never hold one (gateway/requests/admission.py).
    place_check: QueueCheck | None = None
