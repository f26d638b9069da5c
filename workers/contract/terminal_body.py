"""The body of a generation's terminal entry, built the same way by whichever side records it.

A worker records most ends itself; the terminal entry of a non-streamed
completion under the output rules is recorded by the gateway that judged it
(the worker hands the output over and takes its next job; see
docs/architecture.md, "Output rules"). Both build the entry here, so an
entry reads the same whoever wrote it, and the output is kept only as the
request's ``prompt_logging`` obligation allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.contract.jobs import (KEY_REVOKED_MESSAGE, STATUS_CANCELLED, STATUS_COMPLETED, STATUS_FAILED,
                                   STATUS_TIMED_OUT, JobResult)
from workers.contract.output_check import (FINISH_CONTENT_FILTER, OUTPUT_POLICY_UNAVAILABLE, OUTPUT_UNCHECKED,
                                           OutputVerdict, decision_record, logged_client_output)
from workers.contract.privacy import Digester, logged_output

if TYPE_CHECKING:
    from workers.contract.jobs import GenerateJob

#: The error of an output nobody judged in time (its gateway gone, Redis failing): a non-streamed one was
#: not served at all.
UNCHECKED_ERROR = {"code": OUTPUT_UNCHECKED,
                   "message": "no output verdict came from the gateway in time; the output was neither checked "
                              "nor served"}
#: The same for a stream: its gateway released text to the client as windows of it were judged, and only the
#: gateway knew how much (a killed one could not say); the worker knows what it sent, not what was released.
UNCHECKED_STREAM_ERROR = {"code": OUTPUT_UNCHECKED,
                          "message": "no output verdict came from the gateway in time (it stopped or lost Redis); "
                                     "the output was not judged whole and nothing more of it was served; the "
                                     "client may have received a judged part of it, how much is not known"}

#: The error of a stream cancelled with its gateway's ``cancelled`` verdict (its client left, or its
#: gateway stopped, mid-stream or while its last window was judged): ``client_output`` is what the client
#: received.
CANCELLED_ERROR = {"code": STATUS_CANCELLED,
                   "message": "generation was cancelled (the client went away, or its gateway stopped, before the "
                              "output was served whole); client_output is what the client received"}

#: The same for a stream its gateway cancelled because the request's API key was revoked mid-stream.
KEY_REVOKED_STREAM_ERROR = {"code": STATUS_CANCELLED,
                            "message": f"{KEY_REVOKED_MESSAGE}; client_output is what the client received"}

#: The error message of a generation stopped by its gateway's request timeout (recorded ``timed_out``),
#: with or without a verdict: under the output rules the entry's ``client_output`` says what the client
#: received.
GATEWAY_TIMEOUT_MESSAGE = "the gateway's request timeout ran out; generation was stopped"


#: The error of an end the database refused when it came: kept pending, nothing served.
WITHHELD_ERROR = {"code": "audit_unavailable", "message": "the audit store could not be written when the request "
                                                          "ended; the output was withheld from the client"}


def withheld_body(body: dict[str, Any], ended_as: str) -> dict[str, Any]:
    """The body kept pending (``failed``) for an end the database refused: what it was, and why it is not served."""
    return {**body, "error": dict(WITHHELD_ERROR), "ended_as": ended_as}


@dataclass(frozen=True)
class Generated:
    """What a generation that ran produced, and its worker's timings (what a terminal entry needs of it)."""

    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    worker: dict[str, Any]
    queue_ms: float | None
    generate_ms: float
    #: When generation ended (epoch ns, the worker's clock): a later recorder's wait counts from here.
    ended_ns: int = 0

    def to_payload(self) -> dict[str, Any]:
        """Everything but the output (which travels as the report's text)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "worker": dict(self.worker), "queue_ms": self.queue_ms,
                "generate_ms": self.generate_ms, "ended_ns": self.ended_ns}

    @classmethod
    def from_payload(cls, output: str, payload: dict[str, Any]) -> "Generated":
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` if ``payload`` is not one."""
        worker = payload["worker"]
        if not isinstance(worker, dict):
            raise TypeError("worker must be an object")
        queue_ms = payload.get("queue_ms")
        finish = payload.get("finish_reason")
        return cls(output=output, prompt_tokens=int(payload["prompt_tokens"]),
                   completion_tokens=int(payload["completion_tokens"]),
                   finish_reason=None if finish is None else str(finish), worker=worker,
                   queue_ms=None if queue_ms is None else float(queue_ms),
                   generate_ms=float(payload["generate_ms"]), ended_ns=int(payload.get("ended_ns") or 0))

    def waited_ms(self, now_ns: int) -> float:
        """Milliseconds from the end of generation to ``now_ns`` (0 when the end is unknown or later)."""
        return max(0.0, (now_ns - self.ended_ns) / 1e6) if self.ended_ns else 0.0


def judged_fields(job: GenerateJob, verdict: OutputVerdict, digester: Digester | None) -> dict[str, Any]:
    """A checked output's ``output_decision`` (findings as digests) and ``client_output`` (what the client
    received, kept as ``prompt_logging`` allows, masked for the rules' findings too): the same fields in every
    entry that records them, a worker's terminal entry, a timeout's, or a gateway's ``delivered``."""
    return {"output_decision": decision_record(verdict, digester),
            **logged_client_output(verdict.client_text, job.prompt_logging, [*job.redact, *verdict.logged_redact],
                                   digester)}


@dataclass(frozen=True)
class Ending:
    """How a checked generation ends: the entry's kind and finish reason, and what goes into it."""

    kind: str
    finish_reason: str | None
    checked: dict[str, Any] | None = None
    findings: list[dict[str, str]] = field(default_factory=list)
    #: The text its client receives (None: the output itself, when unchecked).
    served: str | None = None
    error: dict[str, str] | None = None


def checked_ending(job: GenerateJob, verdict: OutputVerdict | None, finish_reason: str | None,
                   digester: Digester | None) -> Ending:
    """The end of a checked generation per its gateway's verdict (None: no verdict came).

    The output is kept as generated (as ``prompt_logging`` allows, its
    findings masked too when that asks for redaction), beside the decision
    (findings as digests) and what the client received. A stopped generation
    is a ``completion`` with finish reason ``content_filter``; one the policy
    could not judge, or nobody judged, is ``failed`` and nothing is served.
    A stream whose client left while its last window was judged is
    ``cancelled`` (no finish reason, as any cancelled generation), holding the
    decision on the windows judged before and what the client received; one
    its gateway's request timeout stopped is ``timed_out`` the same way.
    """
    if verdict is None:
        return Ending(STATUS_FAILED, finish_reason, error=dict(UNCHECKED_STREAM_ERROR if job.stream
                                                               else UNCHECKED_ERROR))
    checked = judged_fields(job, verdict, digester)
    if verdict.cancelled and verdict.timed_out:
        return Ending(STATUS_TIMED_OUT, None, checked=checked, findings=verdict.logged_redact,
                      served=verdict.client_text, error={"code": STATUS_TIMED_OUT, "message": GATEWAY_TIMEOUT_MESSAGE})
    if verdict.cancelled:
        return Ending(STATUS_CANCELLED, None, checked=checked, findings=verdict.logged_redact,
                      served=verdict.client_text,
                      error=dict(KEY_REVOKED_STREAM_ERROR if verdict.key_revoked else CANCELLED_ERROR))
    if verdict.unavailable:  # the engine's reasons say why (no evaluator free, a timeout): no text in them
        why = "; ".join(str(reason.get("message", "")) for reason in verdict.decision.get("reasons") or ()
                        if isinstance(reason, dict))
        return Ending(STATUS_FAILED, finish_reason, checked=checked, findings=verdict.logged_redact, error={
            "code": OUTPUT_POLICY_UNAVAILABLE,
            "message": f"the output rules could not be evaluated ({why or 'no answer'}); the output was withheld"})
    finish = FINISH_CONTENT_FILTER if verdict.stopped else finish_reason
    return Ending("completion", finish, checked=checked, findings=verdict.logged_redact, served=verdict.client_text)


def judged_whole(job: GenerateJob, checked: dict[str, Any] | None, finish_reason: str | None,
                 error: dict[str, str] | None) -> bool:
    """Whether the output rules' findings in this output are all known (so ``redacted`` can mask them).

    True when no output rule applies, and for a completion whose verdict judged it to its end; not for an
    end without a verdict (cancelled, timed out, failed, a fallback), a verdict that ended it early
    (cancelled mid-judgement, rules unavailable) or a stream stopped by the rules, whose worker generated on
    after the stopping window (a non-streamed output is judged whole, stopped or not)."""
    if not job.check_output or job.output_rule_absent:
        return True
    if checked is None or error is not None:
        return False
    return not (job.stream and finish_reason == FINISH_CONTENT_FILTER)


def generation_body(job: GenerateJob, generated: Generated, digester: Digester | None, *,
                    checked: dict[str, Any] | None = None, findings: list[dict[str, str]] | None = None,
                    finish_reason: str | None = None, error: dict[str, str] | None = None,
                    extra_timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The terminal entry's body (before its texts move to the payload) of a generation that ran.

    ``checked`` holds the output check's fields, ``findings`` the output's
    findings (masked in a redacted log like the request's), ``error`` a
    failure's error; ``extra_timings`` what the recorder adds to the
    worker's timings (the gateway: how long the judgement took).
    """
    body: dict[str, Any] = {
        **logged_output(generated.output, job.prompt_logging, [*job.redact, *(findings or ())], digester,
                        unjudged=not judged_whole(job, checked, finish_reason, error)),
        **(checked or {}),
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": generated.prompt_tokens, "completion_tokens": generated.completion_tokens,
                  "total_tokens": generated.prompt_tokens + generated.completion_tokens},
        "timings": {"queue_ms": generated.queue_ms, "generate_ms": generated.generate_ms, **(extra_timings or {})},
        "worker": generated.worker,
    }
    if error is not None:
        body["error"] = error
    return body


def ended_result(kind: str, generated: Generated, seq: int, *, finish_reason: str | None, served: str | None,
                 error: dict[str, str] | None) -> JobResult:
    """The result of a recorded generation, as its client is answered (nothing of a failed one is served)."""
    if kind == STATUS_FAILED:
        return JobResult(status=STATUS_FAILED, prompt_tokens=generated.prompt_tokens,
                         completion_tokens=generated.completion_tokens, audit_seq=seq, error=dict(error or {}),
                         queue_ms=generated.queue_ms)
    return JobResult(status=STATUS_COMPLETED if kind == "completion" else kind,
                     text=generated.output if served is None else served, finish_reason=finish_reason,
                     prompt_tokens=generated.prompt_tokens, completion_tokens=generated.completion_tokens,
                     audit_seq=seq, error=dict(error or {}), queue_ms=generated.queue_ms)
