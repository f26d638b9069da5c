"""The policy decision as the gateway enforces it.

The Rego document is checked strictly here, once: the engines turn a
refused document into a deny, since an ignored obligation is a rule that is
not enforced (docs/architecture.md, "Policy decision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Literal, Mapping, cast

from gateway.limits.catalogue import LIMIT_NAMES

PromptLogging = Literal["full", "redacted", "hash"]

#: How much of a prompt the audit trail may keep, from most to least.
PROMPT_LOGGING_LEVELS: tuple[PromptLogging, ...] = ("full", "redacted", "hash")

#: Queue priorities, 0 the most urgent (Celery's convention on Redis).
PRIORITY_RANGE = range(0, 10)

#: Reason code of a deny the gateway made because the policy gave no usable answer.
POLICY_ERROR = "policy_error"
#: Reason code of a refusal the gateway made because no decision could be had in time
#: (the evaluation timed out, no evaluator was free, OPA did not answer): a 503, not a deny.
POLICY_UNAVAILABLE = "policy_unavailable"
#: The code timeouts had before they became ``policy_unavailable``; kept for imports.
POLICY_TIMEOUT = POLICY_UNAVAILABLE


class PolicyUnavailable(RuntimeError):
    """The engine could not answer in time (no free evaluator, a timeout, OPA unreachable).

    Raised where a question other than a request's decision is asked (which
    models a key may see): capacity, not permission, so callers answer a
    retryable 503 ``policy_unavailable`` rather than an empty answer.
    """


class PolicyTimeout(PolicyUnavailable):
    """The evaluation itself ran past the decision timeout: the policy was asked and took too long.

    Callers that serve treat it as any :class:`PolicyUnavailable`; the reload
    trial does not, since such a policy would time out on real requests too
    (``gateway/requests/policy_trial.py``).
    """


class MalformedDecision(ValueError):
    """A decision document does not have the shape of the policy contract."""


@dataclass(frozen=True)
class Reason:
    """Why a request was denied. ``retry_after_s`` (whole seconds, rounded up) is set by limits that lift."""

    code: str
    message: str
    retry_after_s: int | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            doc["retry_after_s"] = self.retry_after_s
        return doc


@dataclass(frozen=True)
class Redaction:
    """A text the gateway must not store in clear, and the detector that found it."""

    detector: str
    text: str

    def to_document(self) -> dict[str, Any]:
        return {"detector": self.detector, "text": self.text}


@dataclass(frozen=True)
class Limits:
    """One scope's usage limits (a principal's or a team's); ``None`` is unlimited.

    One field per ``gateway.limits.catalogue`` entry, in its order (the
    ``limits`` obligation has exactly these keys; tests/test_limits_catalogue.py
    holds the two together).
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    in_flight: int | None = None

    def to_document(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}


@dataclass(frozen=True)
class UsageLimits:
    """The ``limits`` obligation: the principal's limits and its team's (``None`` without a team)."""

    principal: Limits
    team: Limits | None = None

    def to_document(self) -> dict[str, Any]:
        return {
            "principal": self.principal.to_document(),
            "team": None if self.team is None else self.team.to_document(),
        }


@dataclass(frozen=True)
class Obligations:
    """What the gateway must do to a request it serves, as typed attributes.

    ``max_tokens`` and ``prompt_logging`` are always present. ``priority``,
    ``redact`` and ``limits`` are ``None`` when the policy does not give them
    (a policy written before they existed). There is deliberately no
    ``.get(name, default)``: a default chosen at the call site would be the
    least private one. :meth:`to_document` gives the JSON shape.
    """

    max_tokens: int
    prompt_logging: PromptLogging
    priority: int | None = None
    redact: tuple[Redaction, ...] | None = None
    limits: UsageLimits | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"max_tokens": self.max_tokens, "prompt_logging": self.prompt_logging}
        if self.priority is not None:
            doc["priority"] = self.priority
        if self.redact is not None:
            doc["redact"] = [item.to_document() for item in self.redact]
        if self.limits is not None:
            doc["limits"] = self.limits.to_document()
        return doc


_REQUIRED_OBLIGATIONS = ("max_tokens", "prompt_logging")
_OPTIONAL_OBLIGATIONS = ("priority", "redact", "limits")


@dataclass(frozen=True)
class Decision:
    """``data.govgate.decision``: allow, the reasons for a deny, the obligations."""

    allow: bool
    reasons: tuple[Reason, ...]
    obligations: Obligations
    #: For :meth:`unavailable` only: the evaluation ran past the timeout (not a busy pool, not an unreachable
    #: OPA). The answer is the same 503; the reload trial refuses a policy whose decisions time out.
    timed_out: bool = field(default=False, compare=False)

    @classmethod
    def from_document(cls, doc: object) -> "Decision":
        """Check a decision document and build the decision, or raise ``MalformedDecision``."""
        obj, allow, reasons = verdict_head(doc, "decision", allows="allows the request",
                                           refuses="denies the request")
        return cls(allow=allow, reasons=reasons, obligations=_obligations(obj["obligations"]))

    @classmethod
    def fail_closed(cls, code: str, message: str) -> "Decision":
        """A deny made by the gateway itself when the policy gave no usable answer.

        Prompt logging is ``hash``, the most private level: nothing is known
        about which level the principal's roles would have asked for.
        """
        return cls(
            allow=False,
            reasons=(Reason(code=code, message=message),),
            obligations=Obligations(max_tokens=0, prompt_logging="hash"),
        )

    @classmethod
    def unavailable(cls, message: str, retry_after_s: int, *, timed_out: bool = False) -> "Decision":
        """No decision: the policy could not be evaluated in time (a capacity problem).

        Not an answer about the request, so the gateway refuses it with a
        retryable 503 ``policy_unavailable``, never a 403; it stays a refusal
        (fail closed) with the most private prompt logging. ``timed_out``: the
        evaluation ran past the timeout (else no evaluator was free, or OPA
        did not answer).
        """
        return cls(
            allow=False,
            reasons=(Reason(code=POLICY_UNAVAILABLE, message=message, retry_after_s=retry_after_s),),
            obligations=Obligations(max_tokens=0, prompt_logging="hash"),
            timed_out=timed_out,
        )

    @property
    def is_unavailable(self) -> bool:
        """True for :meth:`unavailable`: no decision was made, nothing was denied."""
        return not self.allow and bool(self.reasons) and all(r.code == POLICY_UNAVAILABLE for r in self.reasons)

    def to_document(self) -> dict[str, Any]:
        """The decision in the contract's JSON shape (for the audit trail and responses).

        A refusal for want of a decision carries ``"unavailable": true``, so the
        audit trail does not read as a denial by the policy.
        """
        doc: dict[str, Any] = {
            "allow": self.allow,
            "reasons": [reason.to_document() for reason in self.reasons],
            "obligations": self.obligations.to_document(),
        }
        if self.is_unavailable:
            doc["unavailable"] = True
        return doc


def verdict_head(doc: object, root: str, *, allows: str,
                 refuses: str) -> tuple[Mapping[str, Any], bool, tuple[Reason, ...]]:
    """The checked ``allow`` and ``reasons`` of a decision document (request or output), and the object.

    Both entry points answer ``{allow, reasons, obligations}`` under the same
    rule: reasons explain refusals only; a mix would leave the gateway guessing
    whether the policy meant to allow. ``allows``/``refuses`` word the complaint.
    """
    obj = _object(doc, root, required={"allow", "reasons", "obligations"})
    allow = obj["allow"]
    if not isinstance(allow, bool):
        raise MalformedDecision(f"{root}.allow must be a boolean, got {_kind(allow)}")
    raw_reasons = obj["reasons"]
    if not isinstance(raw_reasons, list):
        raise MalformedDecision(f"{root}.reasons must be a list, got {_kind(raw_reasons)}")
    reasons = tuple(_reason(item, i, root) for i, item in enumerate(raw_reasons))
    if allow and reasons:
        raise MalformedDecision(f"{root} {allows} but gives reasons")
    if not allow and not reasons:
        raise MalformedDecision(f"{root} {refuses} without a reason")
    return obj, allow, reasons


def _reason(item: object, index: int, root: str = "decision") -> Reason:
    where = f"{root}.reasons[{index}]"
    obj = _object(item, where, required={"code", "message"}, optional={"retry_after_s"})
    code, message = obj["code"], obj["message"]
    if not isinstance(code, str) or not code:
        raise MalformedDecision(f"{where}.code must be a non-empty string, got {_kind(code)}")
    if not isinstance(message, str):
        raise MalformedDecision(f"{where}.message must be a string, got {_kind(message)}")
    retry = obj.get("retry_after_s")
    if retry is not None:
        if not isinstance(retry, (int, float)) or not _is_number(retry) or retry < 0:
            raise MalformedDecision(f"{where}.retry_after_s must be a number >= 0, got {retry!r}")
        retry = math.ceil(retry)  # the API promises whole seconds (Rego's ceil() answers 17.0)
    return Reason(code=code, message=message, retry_after_s=retry)


def _obligations(value: object) -> Obligations:
    obj = _object(value, "decision.obligations", required=set(_REQUIRED_OBLIGATIONS),
                  optional=set(_OPTIONAL_OBLIGATIONS))
    max_tokens = _whole_number(obj["max_tokens"], "decision.obligations.max_tokens")
    logging = obj["prompt_logging"]
    if logging not in PROMPT_LOGGING_LEVELS:
        raise MalformedDecision(
            f"decision.obligations.prompt_logging must be one of {list(PROMPT_LOGGING_LEVELS)}, got {logging!r}"
        )
    # An optional obligation is absent or valid: null is not a way to leave one out.
    priority = None
    if "priority" in obj:
        priority = _whole_number(obj["priority"], "decision.obligations.priority")
        if priority not in PRIORITY_RANGE:
            raise MalformedDecision(f"decision.obligations.priority must be from 0 to 9, got {priority}")
    return Obligations(
        max_tokens=max_tokens,
        prompt_logging=cast(PromptLogging, logging),
        priority=priority,
        redact=_redactions(obj["redact"]) if "redact" in obj else None,
        limits=_usage_limits(obj["limits"]) if "limits" in obj else None,
    )


def _redactions(value: object, where: str = "decision.obligations.redact") -> tuple[Redaction, ...]:
    if not isinstance(value, list):
        raise MalformedDecision(f"{where} must be a list, got {_kind(value)}")
    items = []
    for i, item in enumerate(value):
        obj = _object(item, f"{where}[{i}]", required={"detector", "text"})
        for key in ("detector", "text"):
            if not isinstance(obj[key], str) or not obj[key]:
                raise MalformedDecision(f"{where}[{i}].{key} must be a non-empty string, got {_kind(obj[key])}")
        items.append(Redaction(detector=obj["detector"], text=obj["text"]))
    return tuple(items)


def _usage_limits(value: object) -> UsageLimits:
    where = "decision.obligations.limits"
    obj = _object(value, where, required={"principal", "team"})
    team = obj["team"]
    return UsageLimits(
        principal=_limits(obj["principal"], f"{where}.principal"),
        team=None if team is None else _limits(team, f"{where}.team"),
    )


def _limits(value: object, where: str) -> Limits:
    obj = _object(value, where, required=set(LIMIT_NAMES))
    return Limits(**{
        name: None if obj[name] is None else _whole_number(obj[name], f"{where}.{name}") for name in LIMIT_NAMES
    })


def _object(
    value: object, where: str, *, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MalformedDecision(f"{where} must be an object, got {_kind(value)}")
    missing = required - value.keys()
    if missing:
        raise MalformedDecision(f"{where} lacks {sorted(missing)}")
    unknown = value.keys() - required - optional
    if unknown:
        raise MalformedDecision(f"{where} has unknown keys {sorted(map(str, unknown))}")
    return value


def _whole_number(value: object, where: str) -> int:
    # JSON does not tell 3 from 3.0, and Rego arithmetic may produce either,
    # so an integral float is accepted as the integer it is.
    if isinstance(value, (int, float)) and _is_number(value) and float(value).is_integer() and value >= 0:
        return int(value)
    raise MalformedDecision(f"{where} must be a whole number >= 0, got {value!r}")


def _is_number(value: object) -> bool:
    # bool is an int in Python but never a number in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
