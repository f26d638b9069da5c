"""Turning denials, admission refusals and worker failures into designed HTTP errors."""

from __future__ import annotations

import math
from typing import Any

from gateway.errors import ApiError
from gateway.policy import POLICY_UNAVAILABLE, Reason
from workers.contract.jobs import JobResult


#: Reason codes that mean "not now" (429 with Retry-After) rather than "not allowed" (403).
RETRYABLE_CODES = frozenset({"rate_limited", "budget_exceeded", "too_many_in_flight", "queue_full"})


def denial(reasons: tuple[Reason, ...] | list[Reason]) -> ApiError:
    """403 with the reasons; 429 with Retry-After when every reason is a limit that will pass;
    503 with Retry-After when there was no decision at all (``Decision.unavailable``)."""
    documents = [r.to_document() for r in reasons]
    summary = "; ".join(r.message for r in reasons) or "denied by policy"
    if reasons and all(r.code == POLICY_UNAVAILABLE for r in reasons):
        retry = max(math.ceil(r.retry_after_s or 1) for r in reasons)
        return ApiError(503, POLICY_UNAVAILABLE, f"The policy could not decide in time ({summary}); nothing was "
                                                 "denied and nothing was generated. Try again shortly.",
                        extra={"reasons": documents}, headers={"Retry-After": str(retry)})
    if reasons and all(r.code in RETRYABLE_CODES for r in reasons):
        retry = max(math.ceil(r.retry_after_s or 1) for r in reasons)
        return ApiError(429, reasons[0].code if len({r.code for r in reasons}) == 1 else "rate_limited",
                        f"Limit reached: {summary}", extra={"reasons": documents},
                        headers={"Retry-After": str(retry)})
    return ApiError(403, "policy_denied", f"Denied by policy: {summary}", extra={"reasons": documents})


def admission_refusal(admission: dict[str, Any]) -> ApiError:
    code = admission.get("code")
    if code == "usage_unavailable":
        return ApiError(503, code, "Usage limits cannot be checked right now (Redis is unavailable), so the "
                                   "request was refused. Try again shortly.")
    if code == "queue_unavailable":
        return ApiError(503, code, "The request queue is unavailable; nothing was generated. Try again shortly.")
    if code == "context_length_exceeded":
        return ApiError(400, code, f"The prompt is {admission['prompt_tokens']} tokens and max_tokens is "
                                   f"{admission['max_tokens']}: more than the model's context of "
                                   f"{admission['context_length']} tokens.", param="max_tokens")
    if code == "queue_full":
        return denial([Reason(code="queue_full", message=f"{admission['waiting']} requests are already waiting "
                               f"for this model (limit {admission['limit']})", retry_after_s=1)])
    refusal = admission["refusal"]
    return denial([Reason(code=refusal["code"], message=refusal["message"],
                           retry_after_s=refusal["retry_after_s"])])


def worker_error(result: JobResult) -> ApiError:
    code = result.error.get("code", "worker_error")
    message = result.error.get("message", "")
    if result.status == "timed_out":
        return ApiError(504, "timed_out", "The generation hit the worker's time limit; partial output was logged.")
    if result.status == "cancelled":
        return ApiError(503, "cancelled", "The request was cancelled before it completed.")
    if code == "audit_unavailable":
        return ApiError(503, code, "The audit log cannot be written, so the output was withheld.")
    if code == "context_length_exceeded":
        return ApiError(400, code, f"The request does not fit the model's context: {message}", param="messages")
    if code == "generation_failed":
        return ApiError(502, code, f"The model could not generate: {message}")
    return ApiError(502, code, "The model worker failed on this request; it has been logged.")
