"""The policy bench's input mix: realistic requests and what the shipped policy is meant to answer.

Each input is built with :func:`gateway.requests.policy_input.build_input`, as the
gateway builds it; :func:`mix_notes` says where an engine answered otherwise,
so a policy change that turns the mix into something else does not go
unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A fixed time (Tuesday 2023-11-14 12:00 UTC, inside the restricted model's hours) so schedule
#: rules decide the same way on every run.
FIXED_NOW_NS = 1_699_963_200 * 1_000_000_000


@dataclass(frozen=True)
class Sample:
    """One policy input and what the shipped policy is meant to answer to it.

    ``expect_code`` is one reason code the deny must carry (None for an allow).
    """

    name: str
    input: dict[str, Any]
    expect_allow: bool
    expect_code: str | None = None


def _usage(requests: int = 3, tokens_minute: int = 900, today: int = 12_000, month: int = 150_000,
           in_flight: int = 1) -> dict[str, Any]:
    """A usage snapshot shaped as ``UsageCounters.snapshot`` returns it (the team's counters are 4x)."""
    def view(scale: int) -> dict[str, int]:
        return {"requests_last_minute": requests * scale, "tokens_last_minute": tokens_minute * scale,
                "tokens_today": today * scale, "tokens_this_month": month * scale,
                "in_flight": in_flight * scale, "minute_window_frees_in_s": 17}
    return {"principal": view(1), "team": view(4)}


_LONG_CHAT = [
    {"role": "system", "content": "You are a careful assistant for the support team. Answer briefly and "
                                  "never repeat personal data back to the customer."},
    {"role": "user", "content": "Here is the ticket history. " + " ".join(
        f"Entry {i}: the customer reported that the export job failed at step {i % 7} with a timeout "
        f"after {30 + i} seconds; retrying did not help and the log shows a lock wait." for i in range(24))},
    {"role": "assistant", "content": "Understood. Which part should I summarise?"},
    {"role": "user", "content": "Summarise the root cause and draft a reply to ops-desk@example.org."},
]


def sample_inputs() -> list[Sample]:
    """The mix every engine and every mode evaluates, in this order, round robin."""
    from gateway.auth import Principal
    from gateway.requests.policy_input import build_input
    from workers.contract.registry import ModelSpec

    def model(name: str, tags: tuple[str, ...] = ()) -> ModelSpec:
        return ModelSpec(name=name, path=Path("/nonexistent"), context_length=4096, tags=tags)

    def build(roles: tuple[str, ...], model_spec: ModelSpec, *, text: str | None = None,
              messages: list[dict[str, str]] | None = None, team: str = "support", purpose: str | None = None,
              usage: dict[str, Any] | None = None, max_tokens: int = 200) -> dict[str, Any]:
        if messages is None:
            messages = [{"role": "user", "content": text or ""}]
        principal = Principal(id="u-bench", team=team, roles=roles, key_id="k-bench")
        return build_input(principal=principal, endpoint="chat.completions", model=model_spec,
                           max_tokens=max_tokens, stream=False, purpose=purpose, messages=messages,
                           usage=usage if usage is not None else _usage(), now_ns=FIXED_NOW_NS)

    tiny, big = model("govgate-tiny"), model("big")
    restricted = model("govgate-restricted", tags=("restricted",))
    return [
        Sample("allowed: analyst, plain prompt",
               build(("analyst",), tiny, text="Summarise these incident notes in three bullet points."), True),
        Sample("allowed: long chat with an email (redacted)",
               build(("analyst",), tiny, messages=_LONG_CHAT), True),
        Sample("allowed: admin, email+phone+IBAN (redacted)",
               build(("admin",), big, team="research", text="Write to jane.doe@example.com or call "
                     "+44 20 7946 0958; refund to IBAN GB82 WEST 1234 5698 7654 32 today.", max_tokens=1000),
               True),
        Sample("denied by role: viewer",
               build(("viewer",), tiny, text="hello"), False, "model_not_allowed"),
        Sample("denied by role: analyst asks for big",
               build(("analyst",), big, text="hello"), False, "model_not_allowed"),
        Sample("denied by content: card number",
               build(("analyst",), tiny, text="Charge card 4111 1111 1111 1111 exp 12/29 for the order."),
               False, "pii_detected"),
        Sample("denied by content: US SSN",
               build(("analyst",), tiny, text="The applicant's SSN is 123-45-6789, please verify it."),
               False, "pii_detected"),
        Sample("denied by content: private key",
               build(("admin",), big, text="Why does this fail?\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow"),
               False, "blocked_content"),
        Sample("allowed: restricted model with purpose",
               build(("admin",), restricted, team="research", text="Evaluate this answer.", purpose="evaluation"),
               True),
        Sample("denied: restricted model, no purpose",
               build(("admin",), restricted, team="research", text="Evaluate this answer."),
               False, "purpose_required"),
        Sample("allowed: limits nearly exhausted",
               build(("analyst",), tiny, text="One more question.", max_tokens=100,
                     usage=_usage(requests=119, tokens_minute=19_800, today=199_900)), True),
        Sample("denied: requests per minute used up",
               build(("analyst",), tiny, text="One more question.", usage=_usage(requests=120)),
               False, "rate_limited"),
        Sample("denied: daily tokens used up",
               build(("analyst",), tiny, text="One more question.", usage=_usage(today=199_950)),
               False, "budget_exceeded"),
    ]


def mix_notes(name: str, samples: list[Sample], decisions: list[Any]) -> list[str]:
    """Where the engine's answers differ from what the inputs are meant to show."""
    notes = []
    for sample, decision in zip(samples, decisions):
        codes = sorted({reason.code for reason in decision.reasons})
        if decision.allow != sample.expect_allow or (sample.expect_code and sample.expect_code not in codes):
            wanted = "allow" if sample.expect_allow else f"deny {sample.expect_code}"
            got = "allow" if decision.allow else f"deny {','.join(codes)}"
            notes.append(f"{name}: input '{sample.name}' meant to show {wanted}, got {got}")
    return notes
