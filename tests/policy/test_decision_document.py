"""The decision document a policy returns, parsed and checked (``gateway/policy/decision.py``).

Any document that is not exactly the designed shape is refused with
``MalformedDecision``, which the engines turn into a deny.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy import POLICY_ERROR, Decision, MalformedDecision, Obligations, Reason
from gateway.policy.decision import Limits, Redaction, UsageLimits


def test_decision_from_valid_document_round_trips() -> None:
    doc = {
        "allow": False,
        "reasons": [{"code": "over_budget", "message": "m", "retry_after_s": 30}],
        "obligations": {"max_tokens": 0, "prompt_logging": "redacted"},
    }
    decision = Decision.from_document(doc)
    assert decision.reasons == (Reason("over_budget", "m", 30.0),)
    assert decision.obligations.prompt_logging == "redacted"
    assert decision.to_document()["reasons"] == [{"code": "over_budget", "message": "m", "retry_after_s": 30.0}]
    assert decision.to_document()["obligations"] == doc["obligations"]


def document(allow: object = True, reasons: object = (), **obligations: object) -> dict[str, Any]:
    """A decision document; obligations default to valid ones."""
    return {
        "allow": allow,
        "reasons": list(reasons) if isinstance(reasons, tuple) else reasons,
        "obligations": {"max_tokens": 1, "prompt_logging": "full", **obligations},
    }


REASON = {"code": "c", "message": "m"}


def test_document_helper_builds_a_valid_decision() -> None:
    """The malformed cases below differ from this valid one in one field each."""
    assert Decision.from_document(document()) == Decision(True, (), Obligations(1, "full"))
    assert Decision.from_document(document(allow=False, reasons=(REASON,))).reasons == (Reason("c", "m"),)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        document(max_tokens=True),
        document(max_tokens=-1),
        document(max_tokens=1.5),
        {**document(), "obligations": {"prompt_logging": "full"}},
        document(allow=False),
        document(allow=False, reasons=({"code": "", "message": "m"},)),
        document(allow=False, reasons=({"code": "c"},)),
        document(allow=False, reasons=({**REASON, "x": 1},)),
        document(allow=False, reasons=({**REASON, "retry_after_s": -1},)),
        document(allow=False, reasons="no"),
        {**document(), "extra": 1},
    ],
    ids=[
        "null", "max-tokens-bool", "max-tokens-negative", "max-tokens-fraction", "max-tokens-missing",
        "deny-without-reason", "empty-code", "no-message", "unknown-reason-key", "negative-retry",
        "reasons-not-list", "unknown-decision-key",
    ],
)
def test_malformed_decision_document_rejected(doc: object) -> None:
    with pytest.raises(MalformedDecision):
        Decision.from_document(doc)


FULL_OBLIGATIONS = {
    "max_tokens": 5,
    "priority": 3,
    "prompt_logging": "redacted",
    "redact": [{"detector": "email", "text": "a@example.org"}],
    "limits": {
        "principal": {"requests_per_minute": 10, "tokens_per_minute": None, "tokens_per_day": 100,
                      "tokens_per_month": None, "in_flight": 2},
        "team": None,
    },
}


def test_decision_with_every_obligation_round_trips() -> None:
    doc = {"allow": True, "reasons": [], "obligations": FULL_OBLIGATIONS}
    decision = Decision.from_document(doc)
    assert decision.obligations.priority == 3
    assert decision.obligations.redact == (Redaction("email", "a@example.org"),)
    assert decision.obligations.limits == UsageLimits(Limits(10, None, 100, None, 2), None)
    assert decision.obligations.to_document() == FULL_OBLIGATIONS  # the JSON shape, every key kept
    assert decision.to_document() == doc


def test_obligations_a_policy_leaves_out_are_none_and_not_in_the_document() -> None:
    obligations = Decision.from_document(document()).obligations
    assert set(obligations.to_document()) == {"max_tokens", "prompt_logging"}
    assert obligations.priority is None and obligations.redact is None and obligations.limits is None


def test_obligations_offer_no_lookup_with_a_default() -> None:
    """Typed attributes only: a ``.get(name, default)`` would let a caller pick the least private default."""
    obligations = Decision.from_document(document()).obligations
    assert not hasattr(obligations, "get")
    with pytest.raises(TypeError):
        obligations["prompt_logging"]  # type: ignore[index]


PRINCIPAL_LIMITS = FULL_OBLIGATIONS["limits"]["principal"]


def test_team_limits_round_trip() -> None:
    limits = {"principal": PRINCIPAL_LIMITS, "team": {**PRINCIPAL_LIMITS, "in_flight": None}}
    decision = Decision.from_document(document(limits=limits))
    assert decision.obligations.limits is not None
    assert decision.obligations.limits.team == Limits(10, None, 100, None, None)


@pytest.mark.parametrize(
    "obligations",
    [
        {"priority": 10},
        {"priority": -1},
        {"priority": "high"},
        {"priority": None},
        {"limits": None},
        {"redact": "all"},
        {"redact": [{"detector": "email"}]},
        {"redact": [{"detector": "email", "text": ""}]},
        {"redact": [{"detector": "email", "text": "a", "at": 3}]},
        {"limits": {"principal": PRINCIPAL_LIMITS}},
        {"limits": {"principal": {"requests_per_minute": 10}, "team": None}},
        {"limits": {"principal": PRINCIPAL_LIMITS, "team": {**PRINCIPAL_LIMITS, "in_flight": -1}}},
        {"limits": {"principal": {**PRINCIPAL_LIMITS, "in_flight": 1.5}, "team": None}},
    ],
    ids=[
        "priority-above-9", "priority-negative", "priority-string", "priority-null", "limits-null",
        "redact-not-list", "redact-no-text", "redact-empty-text", "redact-unknown-key", "limits-no-team",
        "limits-missing-names", "limits-negative", "limits-fraction",
    ],
)
def test_malformed_new_obligation_rejected(obligations: dict[str, Any]) -> None:
    with pytest.raises(MalformedDecision):
        Decision.from_document(document(**obligations))


def test_fail_closed_is_a_deny_with_one_reason() -> None:
    decision = Decision.fail_closed(POLICY_ERROR, "broken")
    assert not decision.allow
    assert decision.reasons == (Reason(POLICY_ERROR, "broken"),)
    assert decision.obligations == Obligations(max_tokens=0, prompt_logging="hash")
