"""What the shipped policy (``policies/``) decides, asked through the embedded engine.

Roles and models, token caps, priorities, usage limits and budgets, personal
data: one request input each, checked against the decision the shipped data
document should give. ``test_policy_cases.py`` runs a table of whole
decisions through both engines; these name each rule on its own.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy import Decision, EmbeddedPolicyEngine, Obligations
from gateway.policy.decision import Limits, Redaction, UsageLimits
from tests.policy.embedded_fixtures import BIG, TINY, anyio_backend, codes, request_input, shipped, with_text  # noqa: F401


# The limits policies/data.json gives a principal and a team without entries of their own.
SHIPPED_LIMITS = UsageLimits(
    principal=Limits(requests_per_minute=120, tokens_per_minute=20000, tokens_per_day=200000,
                     tokens_per_month=None, in_flight=8),
    team=Limits(requests_per_minute=600, tokens_per_minute=100000, tokens_per_day=1000000,
                tokens_per_month=20000000, in_flight=32),
)


def usage(principal: dict[str, Any], team: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``input.usage`` snapshot: every counter 0 unless given."""
    zero = {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
            "in_flight": 0, "minute_window_frees_in_s": 0}
    return {"principal": {**zero, **principal}, "team": None if team is None else {**zero, **team}}


@pytest.mark.anyio
async def test_analyst_allowed_granted_model(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst"]))
    assert decision == Decision(True, (), Obligations(max_tokens=100, prompt_logging="full", priority=5,
                                                      redact=(), limits=SHIPPED_LIMITS))


@pytest.mark.anyio
async def test_admin_role_priority_applies(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["admin"]))
    assert decision.obligations.priority == 2


@pytest.mark.anyio
async def test_rate_limit_denies_with_retry_after(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide({**request_input(["analyst"]),
                                     "usage": usage({"requests_last_minute": 120, "minute_window_frees_in_s": 7.5})})
    assert not decision.allow
    assert codes(decision) == ["rate_limited"]
    assert decision.reasons[0].retry_after_s == 8
    assert "principal 'u-1'" in decision.reasons[0].message and "requests_per_minute" in decision.reasons[0].message


@pytest.mark.anyio
async def test_team_budget_binds_and_retries_at_midnight(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide({**request_input(["analyst"]),
                                     "usage": usage({}, {"tokens_today": 999_950})})
    assert codes(decision) == ["budget_exceeded"]
    assert "team 't-1'" in decision.reasons[0].message
    assert decision.reasons[0].retry_after_s == 6400  # 2023-11-14 22:13:20 UTC to midnight


@pytest.mark.anyio
async def test_personal_data_redacted_or_denied(shipped: EmbeddedPolicyEngine) -> None:
    text = "mail ann@example.org, call +44 20 7946 0958"
    allowed = await shipped.decide(with_text(request_input(["analyst"]), text))
    assert allowed.allow
    assert allowed.obligations.prompt_logging == "redacted"
    assert allowed.obligations.redact == (Redaction("email", "ann@example.org"), Redaction("phone", "+44 20 7946 0958"))
    denied = await shipped.decide(with_text(request_input(["analyst"]), "card 4111 1111 1111 1111"))
    assert codes(denied) == ["pii_detected"]
    assert "4111" not in denied.reasons[0].message


@pytest.mark.anyio
async def test_malformed_input_denied_with_reason_not_error(shipped: EmbeddedPolicyEngine) -> None:
    bad = request_input(["analyst"])
    bad["request"] = {**bad["request"], "max_tokens": "lots", "text": None}
    bad["usage"] = {"principal": {"in_flight": "two"}, "team": None}
    decision = await shipped.decide(bad)
    assert not decision.allow
    assert set(codes(decision)) == {"invalid_input"}
    assert len(decision.reasons) == 3


@pytest.mark.anyio
async def test_analyst_denied_other_model_with_reason(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst"], BIG))
    assert not decision.allow
    assert codes(decision) == ["model_not_allowed"]
    assert "'big'" in decision.reasons[0].message


@pytest.mark.anyio
async def test_viewer_denied_every_model(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["viewer"]))
    assert not decision.allow
    assert codes(decision) == ["model_not_allowed"]


@pytest.mark.anyio
async def test_max_tokens_clamped_to_role_cap(shipped: EmbeddedPolicyEngine) -> None:
    analyst = await shipped.decide(request_input(["analyst"], max_tokens=1000))
    admin = await shipped.decide(request_input(["admin"], BIG, max_tokens=100_000))
    assert analyst.allow and analyst.obligations.max_tokens == 256
    assert admin.allow and admin.obligations.max_tokens == 4096


@pytest.mark.anyio
async def test_most_generous_cap_of_granting_roles_applies(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["analyst", "admin"], max_tokens=1000))
    assert decision.obligations.max_tokens == 1000


@pytest.mark.anyio
async def test_unknown_role_denied_with_reason(shipped: EmbeddedPolicyEngine) -> None:
    decision = await shipped.decide(request_input(["stranger"]))
    assert not decision.allow
    assert codes(decision) == ["unknown_role"]
    assert "u-1" in decision.reasons[0].message


@pytest.mark.anyio
async def test_visible_models_follow_roles(shipped: EmbeddedPolicyEngine) -> None:
    views = [TINY.policy_view(), BIG.policy_view()]
    principal = request_input([])["principal"]
    assert await shipped.visible_models({**principal, "roles": ["admin"]}, views) == {"govgate-tiny", "big"}
    assert await shipped.visible_models({**principal, "roles": ["analyst"]}, views) == {"govgate-tiny"}
    assert await shipped.visible_models({**principal, "roles": ["viewer"]}, views) == set()
    assert await shipped.visible_models({**principal, "roles": ["stranger"]}, views) == set()
