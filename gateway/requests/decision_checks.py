"""The gateway's own checks of a request decision, beyond its shape: shared by admission and the reload trial.

:class:`gateway.policy.Decision` checks the document's shape; some answers
are well-formed and still unusable, and the gateway refuses or corrects
them itself. These checks run on every real request
(:mod:`gateway.requests.admission`) and on the reload trial's decisions
(:mod:`gateway.requests.policy_trial`): the trial once skipped them, and a
policy allowing with ``max_tokens`` 0 was loaded, after which every allowed
request was refused with ``policy_error`` (probe h10 F5).
"""

from __future__ import annotations

import dataclasses

from gateway.policy import POLICY_ERROR, Decision


def checked_decision(decision: Decision, requested_max: int) -> Decision:
    """``decision`` as the gateway enforces it for a request asking ``requested_max`` completion tokens.

    An allow with ``max_tokens`` below 1 could generate nothing: a
    ``policy_error``. An allow above the request's own bound is clamped to
    it: the obligation caps what was asked, and a policy naming a constant
    above it would generate (and charge) more than the client's own bound.
    """
    if not decision.allow:
        return decision
    if decision.obligations.max_tokens < 1:  # nothing could be generated
        return Decision.fail_closed(POLICY_ERROR, "the policy allowed the request with max_tokens 0")
    if decision.obligations.max_tokens > requested_max:
        return dataclasses.replace(decision, obligations=dataclasses.replace(decision.obligations,
                                                                             max_tokens=requested_max))
    return decision
