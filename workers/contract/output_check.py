"""The output check between a worker and its gateway: the report, the verdict, and what the log keeps of them.

The policy engine lives in the gateway, and the terminal entry must record
the output decision and what the client received. So a worker that
generated for a checked job reports the output (``o`` on the gateway's reply
channel, sealed). For a stream (or a job its gateway did not offer to
record) it then waits for the verdict (sealed, on
``govgate:verdict:<request id>``) and records; a non-streamed completion is
handed over instead: the report carries what the entry needs, the gateway
judges and records it, and the worker takes its next job at once (a
fallback entry kept in Redis records the output unchecked if no gateway
does). See docs/architecture.md, "Output rules".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import msgspec

from workers.contract.privacy import FULL, REDACTED, Digester, mask
from workers.contract.sealing import Sealer

#: Kind of the reply-channel message that carries a worker's output report.
REPLY_OUTPUT = "o"
#: Prefix of the list the gateway LPUSHes a request's verdict on (the worker BLPOPs it).
VERDICT_KEY_PREFIX = "govgate:verdict:"
#: How long an unread verdict is kept: longer than any worker waits for one.
VERDICT_TTL_S = 300
#: The job-state value a gateway writes to stop a generation the output rules stopped (any other
#: value but ``started`` is an ordinary cancel: the client left, or the gateway gave up).
STOP_CONTENT_FILTER = b"content_filter"
#: OpenAI's finish reason for a completion the output rules ended.
FINISH_CONTENT_FILTER = "content_filter"
#: Error codes of a terminal entry whose output could not be checked.
OUTPUT_UNCHECKED = "output_unchecked"
OUTPUT_POLICY_UNAVAILABLE = "output_policy_unavailable"


def verdict_key(request_id: str) -> str:
    return VERDICT_KEY_PREFIX + request_id


@dataclass(frozen=True)
class OutputReport:
    """What a worker generated, sent to the gateway to be judged (``stopped``: the gateway stopped it).

    ``handed_over``: the worker does not wait for a verdict; the gateway
    records the terminal entry itself from these fields (the generation's
    counts and timings, ``workers.contract.terminal_body.Generated``'s payload).
    """

    text: str
    stopped: bool = False
    handed_over: dict[str, Any] | None = None

    def sealed(self, sealer: Sealer) -> str:
        document: dict[str, Any] = {"text": self.text, "stopped": self.stopped}
        if self.handed_over is not None:
            document["handed_over"] = self.handed_over
        return sealer.seal_text(msgspec.json.encode(document))  # json.dumps's JSON, for a tenth of its CPU

    @classmethod
    def opened(cls, raw: str | bytes, sealer: Sealer) -> "OutputReport":
        """Raises :class:`~workers.contract.sealing.SealError` or ``ValueError`` if it is not one."""
        document = json.loads(sealer.unseal_text(raw))
        if not isinstance(document, dict) or not isinstance(document.get("text"), str):
            raise ValueError("not an output report")
        handed_over = document.get("handed_over")
        if handed_over is not None and not isinstance(handed_over, dict):
            raise ValueError("not an output report")
        return cls(text=document["text"], stopped=bool(document.get("stopped")), handed_over=handed_over)


@dataclass(frozen=True)
class OutputVerdict:
    """The gateway's answer: the output decision, and the exact text its client receives.

    ``decision`` is ``{"allow", "reasons": [{code, message}], "redact": [{detector, text}]}``,
    every window of a stream folded into one. ``unavailable``: the policy
    could not judge, the client gets an error and the worker records a failure.
    ``cancelled``: the stream's client left while the gateway judged the
    output's last window; that judgement was abandoned, ``decision`` folds
    the windows judged before it and ``client_text`` is what the client
    received, and the worker records ``cancelled`` (without this answer it
    waited out its whole verdict timeout, its model idle). Sent only when
    set; a worker older than the field reads it as an ordinary verdict on
    the text the client received (a ``completion``). The gateway sends it
    too when it cancels a stream (its client left, its drain cut it) or its
    request timeout stops one (``timed_out`` then set as well: the worker
    records ``timed_out``, not ``cancelled``; a worker older than that field
    records ``cancelled``), before it sets the stop: what the client received
    is then in the entry whichever way the stream ended.
    """

    decision: dict[str, Any]
    client_text: str
    stopped: bool = False
    unavailable: bool = False
    revision: str = ""
    cancelled: bool = False
    timed_out: bool = False
    #: With ``cancelled``: the request's key was revoked while it streamed (``gateway/auth/revocations.py``);
    #: the worker's ``cancelled`` entry says so. A worker older than the field records a plain ``cancelled``.
    key_revoked: bool = False

    def to_payload(self) -> dict[str, Any]:
        payload = {"decision": self.decision, "client_text": self.client_text, "stopped": self.stopped,
                   "unavailable": self.unavailable, "revision": self.revision}
        if self.cancelled:  # only then: every other verdict stays as it was
            payload["cancelled"] = True
            if self.timed_out:
                payload["timed_out"] = True
            if self.key_revoked:
                payload["key_revoked"] = True
        return payload

    def sealed(self, sealer: Sealer) -> bytes:
        return sealer.seal(json.dumps(self.to_payload()).encode())

    @classmethod
    def opened(cls, raw: bytes, sealer: Sealer) -> "OutputVerdict":
        """Raises :class:`~workers.contract.sealing.SealError` or ``ValueError`` if it is not one."""
        document = json.loads(sealer.unseal(raw))
        if not isinstance(document, dict) or not isinstance(document.get("decision"), dict) \
                or not isinstance(document.get("client_text"), str):
            raise ValueError("not an output verdict")
        return cls(decision=document["decision"], client_text=document["client_text"],
                   stopped=bool(document.get("stopped")), unavailable=bool(document.get("unavailable")),
                   revision=str(document.get("revision") or ""), cancelled=bool(document.get("cancelled")),
                   timed_out=bool(document.get("cancelled")) and bool(document.get("timed_out")),
                   key_revoked=bool(document.get("cancelled")) and bool(document.get("key_revoked")))

    @classmethod
    def unruled(cls, text: str, revision: str) -> "OutputVerdict":
        """The verdict on ``text`` under a policy revision with no output rule: it passes whole.

        What the gateway's engine answers for such a policy
        (``OutputDecision.allowed()``), folded as :class:`HoldBack` folds it,
        so that the entry is the same whether the gateway was asked or not.
        """
        return cls(decision={"allow": True, "reasons": [], "redact": []}, client_text=text, revision=revision)

    @property
    def redact(self) -> list[dict[str, str]]:
        """The findings the client's text was masked for (``[{detector, text}]``)."""
        return [item for item in self.decision.get("redact") or () if isinstance(item, dict)]

    @property
    def logged_redact(self) -> list[dict[str, str]]:
        """The findings the audit's copies of the output mask: :attr:`redact`'s, and those the client received
        as they are that a ``redacted`` log masks all the same (the output rules' ``log_redact``)."""
        return [*self.redact, *(item for item in self.decision.get("log_redact") or () if isinstance(item, dict))]


def decision_record(verdict: OutputVerdict, digester: Digester | None) -> dict[str, Any]:
    """The output decision as the terminal entry records it: findings as detector and keyed digest.

    The same treatment as the request decision's ``redact``
    (``gateway/requests/audit_records.py``): a finding stored in clear beside
    a masked output would undo the mask.
    """
    findings = [{"detector": str(item.get("detector", "pii")),
                 **({"hmac_sha256": digester.hexdigest(str(item.get("text", "")))} if digester else {})}
                for item in verdict.redact]
    return {"allow": bool(verdict.decision.get("allow")), "reasons": list(verdict.decision.get("reasons") or []),
            "findings": findings, "stopped": verdict.stopped, "policy_revision": verdict.revision}


def logged_client_output(text: str, mode: str, redact: Iterable[Mapping[str, Any]],
                         digester: Digester | None) -> dict[str, Any]:
    """What the client received, kept as ``prompt_logging`` allows (as :func:`~workers.contract.privacy.logged_output`)."""
    if mode == FULL:
        return {"client_output": text}
    if mode == REDACTED:
        masked = mask(text, redact)
        return {"client_output": masked, **({"client_output_masked": True} if masked != text else {})}
    digest = {"client_output_hmac_sha256": digester.hexdigest(text)} if digester is not None else {}
    return {**digest, "client_output_chars": len(text)}

