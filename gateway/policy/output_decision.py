"""The output decision as the gateway enforces it: let generated text through, mask findings, or stop.

``data.govgate.output_decision`` (policies/output.rego) is checked here
strictly, once, as the request decision is (:mod:`gateway.policy.decision`):
a document of another shape is a stop with ``policy_error``, since an
ignored obligation is a rule that is not enforced. README "Output rules".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.policy.decision import (
    POLICY_ERROR,
    POLICY_UNAVAILABLE,
    Reason,
    Redaction,
    _object,
    _redactions,
    verdict_head,
)

#: The rule whose value is the decision on one window of output.
OUTPUT_DECISION_RULE = "data.govgate.output_decision"

__all__ = ["OUTPUT_DECISION_RULE", "OutputDecision"]


@dataclass(frozen=True)
class OutputDecision:
    """``data.govgate.output_decision``: allow (else stop), the reasons for a stop, the findings to mask.

    ``allow`` false means STOP: end the completion with ``finish_reason``
    ``content_filter``; ``reasons`` is then never empty. ``redact`` lists the
    findings to mask in what the client receives and in the audit; on a stop
    it lists the stopping findings too, so that the audit entry of the output
    as generated keeps none of them in clear. ``log_redact`` lists findings
    the client may receive that the audit's copy masks (a request logged
    ``redacted``: every finding is masked there, an allowed one too).
    """

    allow: bool
    reasons: tuple[Reason, ...]
    redact: tuple[Redaction, ...] = ()
    log_redact: tuple[Redaction, ...] = ()
    #: For :meth:`unavailable` only: the evaluation ran past the timeout (``Decision.timed_out``).
    timed_out: bool = field(default=False, compare=False)

    @classmethod
    def from_document(cls, doc: object) -> "OutputDecision":
        """Check an output decision document and build the decision, or raise ``MalformedDecision``."""
        obj, allow, reasons = verdict_head(doc, "output_decision", allows="allows the output",
                                           refuses="stops the output")
        obligations = _object(obj["obligations"], "output_decision.obligations", required=set(),
                              optional={"redact", "log_redact"})
        redact, log_redact = ((_redactions(obligations[name], f"output_decision.obligations.{name}")
                               if name in obligations else ()) for name in ("redact", "log_redact"))
        return cls(allow=allow, reasons=reasons, redact=redact, log_redact=log_redact)

    @classmethod
    def allowed(cls) -> "OutputDecision":
        """Let the output through untouched: the answer for a policy that has no output rule."""
        return cls(allow=True, reasons=())

    @classmethod
    def fail_closed(cls, code: str, message: str) -> "OutputDecision":
        """A stop made by the gateway itself when the policy gave no usable answer."""
        return cls(allow=False, reasons=(Reason(code=code, message=message),))

    @classmethod
    def unavailable(cls, message: str, retry_after_s: int | None = None, *,
                    timed_out: bool = False) -> "OutputDecision":
        """No decision could be had in time (a capacity problem): a stop, ``policy_unavailable``;
        ``timed_out``: the evaluation ran past the timeout."""
        return cls(allow=False, reasons=(Reason(code=POLICY_UNAVAILABLE, message=message,
                                                retry_after_s=retry_after_s),), timed_out=timed_out)

    @property
    def is_unavailable(self) -> bool:
        """True for :meth:`unavailable`: nothing was judged, the output was stopped for want of an answer."""
        return not self.allow and bool(self.reasons) and all(r.code == POLICY_UNAVAILABLE for r in self.reasons)

    @property
    def is_policy_error(self) -> bool:
        """True when the stop is the gateway's own for a policy that gave no usable answer."""
        return not self.allow and any(r.code == POLICY_ERROR for r in self.reasons)

    def to_document(self) -> dict[str, Any]:
        """The decision in the contract's JSON shape (for the audit trail), ``"unavailable": true`` added
        to a stop for want of an answer."""
        doc: dict[str, Any] = {
            "allow": self.allow,
            "reasons": [reason.to_document() for reason in self.reasons],
            "obligations": {"redact": [item.to_document() for item in self.redact],
                            "log_redact": [item.to_document() for item in self.log_redact]},
        }
        if self.is_unavailable:
            doc["unavailable"] = True
        return doc
