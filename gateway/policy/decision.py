"""The policy decision as the gateway enforces it.

A decision document comes from Rego, which the gateway does not control: an
operator's edit can change its shape at any time. So the document is checked
strictly here, once, and anything the gateway would have to guess about is
refused. The engines turn a refused document into a deny; an obligation the
gateway does not understand is never silently dropped, because an ignored
obligation is a rule that is not enforced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AbstractSet, Any, Iterator, Literal, Mapping, cast

PromptLogging = Literal["full", "redacted", "hash"]

#: How much of a prompt the audit trail may keep, from most to least.
PROMPT_LOGGING_LEVELS: tuple[PromptLogging, ...] = ("full", "redacted", "hash")

#: Reason code of a deny the gateway made because the policy gave no usable answer.
POLICY_ERROR = "policy_error"
#: Reason code of a deny the gateway made because the policy took too long.
POLICY_TIMEOUT = "policy_timeout"


class MalformedDecision(ValueError):
    """A decision document does not have the shape of the policy contract."""


@dataclass(frozen=True)
class Reason:
    """Why a request was denied. ``retry_after_s`` is set by limits that lift."""

    code: str
    message: str
    retry_after_s: float | None = None

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            doc["retry_after_s"] = self.retry_after_s
        return doc


@dataclass(frozen=True)
class Obligations(Mapping[str, Any]):
    """What the gateway must do to a request it serves.

    Also a read-only mapping (``obligations["max_tokens"]``, ``.get(...)``), the
    way the contract names them, so callers can treat obligations added by later
    contracts the same way.
    """

    max_tokens: int
    prompt_logging: PromptLogging

    def __getitem__(self, key: str) -> Any:
        if key in _OBLIGATION_KEYS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(_OBLIGATION_KEYS)

    def __len__(self) -> int:
        return len(_OBLIGATION_KEYS)

    def to_document(self) -> dict[str, Any]:
        return dict(self)


_OBLIGATION_KEYS = ("max_tokens", "prompt_logging")


@dataclass(frozen=True)
class Decision:
    """``data.govgate.decision``: allow, the reasons for a deny, the obligations."""

    allow: bool
    reasons: tuple[Reason, ...]
    obligations: Obligations

    @classmethod
    def from_document(cls, doc: object) -> "Decision":
        """Check a decision document and build the decision, or raise ``MalformedDecision``."""
        obj = _object(doc, "decision", required={"allow", "reasons", "obligations"})
        allow = obj["allow"]
        if not isinstance(allow, bool):
            raise MalformedDecision(f"decision.allow must be a boolean, got {_kind(allow)}")
        raw_reasons = obj["reasons"]
        if not isinstance(raw_reasons, list):
            raise MalformedDecision(f"decision.reasons must be a list, got {_kind(raw_reasons)}")
        reasons = tuple(_reason(item, i) for i, item in enumerate(raw_reasons))
        # Reasons explain denials only; a mix would leave the gateway guessing
        # whether the policy meant to allow.
        if allow and reasons:
            raise MalformedDecision("decision allows the request but gives reasons")
        if not allow and not reasons:
            raise MalformedDecision("decision denies the request without a reason")
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

    def to_document(self) -> dict[str, Any]:
        """The decision in the contract's JSON shape (for the audit trail and responses)."""
        return {
            "allow": self.allow,
            "reasons": [reason.to_document() for reason in self.reasons],
            "obligations": self.obligations.to_document(),
        }


def _reason(item: object, index: int) -> Reason:
    where = f"decision.reasons[{index}]"
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
        retry = float(retry)
    return Reason(code=code, message=message, retry_after_s=retry)


def _obligations(value: object) -> Obligations:
    obj = _object(value, "decision.obligations", required=set(_OBLIGATION_KEYS))
    max_tokens = _whole_number(obj["max_tokens"], "decision.obligations.max_tokens")
    logging = obj["prompt_logging"]
    if logging not in PROMPT_LOGGING_LEVELS:
        raise MalformedDecision(
            f"decision.obligations.prompt_logging must be one of {list(PROMPT_LOGGING_LEVELS)}, got {logging!r}"
        )
    return Obligations(max_tokens=max_tokens, prompt_logging=cast(PromptLogging, logging))


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
