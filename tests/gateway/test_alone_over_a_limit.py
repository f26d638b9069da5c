"""Which requests no wait lets pass (``alone_over_a_limit``) and the 429 they get (``denial(never=…)``)."""

from __future__ import annotations

from gateway.policy import Obligations, Reason
from gateway.policy.decision import Limits, UsageLimits
from gateway.requests.refusals import alone_over_a_limit, denial


def obliged(max_tokens: int, principal: Limits, team: Limits | None = None) -> Obligations:
    return Obligations(max_tokens=max_tokens, prompt_logging="full", limits=UsageLimits(principal, team))


def test_a_request_alone_over_a_token_limit_or_under_a_zero_limit_never_passes() -> None:
    assert alone_over_a_limit(obliged(10, Limits(tokens_per_minute=10, tokens_per_day=10))) is None  # fits, just
    assert "principal limit tokens_per_day is 9" in alone_over_a_limit(obliged(10, Limits(tokens_per_day=9)))
    assert "team limit tokens_per_month is 5" in alone_over_a_limit(
        obliged(10, Limits(tokens_per_day=100), Limits(tokens_per_month=5)))
    assert "principal limit in_flight is 0" in alone_over_a_limit(obliged(1, Limits(in_flight=0)))
    assert alone_over_a_limit(obliged(10, Limits(requests_per_minute=1, in_flight=1))) is None
    assert alone_over_a_limit(Obligations(max_tokens=10**6, prompt_logging="full")) is None  # no limits obliged


def test_its_429_has_no_retry_after_and_says_not_to_retry() -> None:
    reasons = [Reason(code="rate_limited", message="over", retry_after_s=7)]
    usual = denial(reasons)
    assert (usual.status, usual.headers) == (429, {"Retry-After": "7"})
    never = denial(reasons, never="its principal limit tokens_per_minute is 10")
    assert (never.status, never.code, never.headers) == (429, "rate_limited", {"x-should-retry": "false"})
    assert never.body()["error"]["reasons"] == [{"code": "rate_limited", "message": "over"}]
    assert "tokens_per_minute is 10" in never.message and "fewer tokens" in never.message
    denied = denial([Reason(code="model_not_allowed", message="no")], never="anything")
    assert (denied.status, denied.headers) == (403, {})  # not a limit: a 403 as before


def test_with_its_tokens_the_prompt_counts_against_the_token_limits_only() -> None:
    """What the reservation would hold (prompt and max_tokens) against token limits; a request is one request
    (probe s59 H1: max_tokens 195 under a limit of 200 fitted alone, with its prompt never)."""
    obligations = obliged(195, Limits(tokens_per_minute=200, requests_per_minute=1))
    assert alone_over_a_limit(obligations) is None
    assert alone_over_a_limit(obligations, tokens=200) is None
    assert "principal limit tokens_per_minute is 200 and the request alone costs 201" in alone_over_a_limit(
        obligations, tokens=201)
    assert alone_over_a_limit(obliged(5, Limits(requests_per_minute=1)), tokens=10**6) is None
