"""Why a request was refused, as typed values that each know their designed HTTP error.

Denials come from the policy's reasons, admission refusals from the checks
made after an allow (context, limits, queue), worker errors from the job's
result; each also says what the audit entry records of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from gateway.api_errors import ApiError
from gateway.limits import RETRYABLE_CODES, Refusal, TeamPlaces
from gateway.limits.fair_share import CEILING_FACTOR, FALLBACK_SERVICE_MS, drain_wait_s
from gateway.limits.catalogue import QUEUE_FULL, USAGE_LIMITS
from gateway.policy import POLICY_UNAVAILABLE, Obligations, Reason
from workers.contract.gateway_liveness import GATEWAY_GONE
from workers.contract.jobs import STREAM_WORKER_LOST, WORKER_LOST, JobResult
from workers.contract.output_check import OUTPUT_POLICY_UNAVAILABLE, OUTPUT_UNCHECKED



def denial(reasons: tuple[Reason, ...] | list[Reason], *, never: str | None = None) -> ApiError:
    """403 with the reasons; 429 with Retry-After when every reason is a limit that will pass;
    503 with Retry-After when there was no decision at all (``Decision.unavailable``).

    ``never``: why no wait lets this request pass a limit (:func:`alone_over_a_limit`). A 429 then has no
    Retry-After and no ``retry_after_s``, says so, and tells OpenAI's clients not to retry (:data:`DO_NOT_RETRY`):
    they wait the Retry-After (up to two minutes) and ask twice more for the same refusal."""
    documents = [r.to_document() for r in reasons]
    summary = "; ".join(r.message for r in reasons) or "denied by policy"
    if reasons and all(r.code == POLICY_UNAVAILABLE for r in reasons):
        retry = max(math.ceil(r.retry_after_s or 1) for r in reasons)
        return ApiError(503, POLICY_UNAVAILABLE, f"The policy could not decide in time ({summary}); nothing was "
                                                 "denied and nothing was generated. Try again shortly.",
                        extra={"reasons": documents}, headers={"Retry-After": str(retry)})
    if reasons and all(r.code in RETRYABLE_CODES for r in reasons):
        code = reasons[0].code if len({r.code for r in reasons}) == 1 else "rate_limited"
        if never is not None:
            return ApiError(429, code, f"Limit reached: {summary}. No wait lets this request pass: {never}; ask for "
                            "fewer tokens (max_tokens) or send a shorter prompt.",
                            extra={"reasons": [{k: v for k, v in d.items() if k != "retry_after_s"}
                                               for d in documents]}, headers=DO_NOT_RETRY)
        retry = max(math.ceil(r.retry_after_s or 1) for r in reasons)
        return ApiError(429, code, f"Limit reached: {summary}", extra={"reasons": documents},
                        headers={"Retry-After": str(retry)})
    return ApiError(403, "policy_denied", f"Denied by policy: {summary}", extra={"reasons": documents})


def alone_over_a_limit(obligations: Obligations, tokens: int | None = None) -> str | None:
    """Which of the ``limits`` obligation's limits the request alone exceeds (its tokens over a token limit, any
    request over a limit of 0), or None. Such a request is never admitted under these limits, whatever the
    counters say. ``tokens``: what its reservation would hold (prompt and ``max_tokens``); None: its granted
    ``max_tokens`` alone, which it holds at least."""
    limits = obligations.limits
    if limits is None:
        return None
    for kind, scope in (("principal", limits.principal), ("team", limits.team)):
        if scope is None:
            continue
        for limit in USAGE_LIMITS:
            value = getattr(scope, limit.name)
            cost = (obligations.max_tokens if tokens is None else tokens) if limit.cost == "tokens" else 1
            if value is not None and cost > value:
                return f"its {kind} limit {limit.name} is {value} and the request alone costs {cost}"
    return None


#: Tells OpenAI's clients not to retry (they retry every 5xx twice by default, each time as a new request): a
#: job that ended its workers would end two more each time, one that ran into the generation time limit would
#: run into it twice more, charged each time (``x-should-retry`` is the header they obey).
DO_NOT_RETRY = {"x-should-retry": "false"}

MODEL_UNAVAILABLE = "model_unavailable"
#: What a refusal for a model that cannot be loaded suggests to a client that polls: an operator must act (the
#: model was given up, nothing reloads it by itself), so a minute is a polite poll; OpenAI's clients are told not
#: to retry at all (:data:`DO_NOT_RETRY`), as their two automatic retries would hold the caller ~2 minutes.
MODEL_UNAVAILABLE_RETRY_S = 60

USAGE_UNAVAILABLE_MESSAGE = ("Usage limits cannot be checked right now (Redis is unavailable), so the request was "
                             "refused. Try again shortly.")
#: A job Redis lost before any worker ran it (it came back without its data: gateway/dispatch/lost_jobs.py).
QUEUE_LOST = "queue_lost"
QUEUE_UNAVAILABLE_MESSAGE = "The request queue is unavailable; nothing was generated. Try again shortly."


@dataclass(frozen=True)
class ContextTooLong:
    """The prompt, counted by the model's tokenizer, and ``max_tokens`` do not fit the context."""

    prompt_tokens: int
    max_tokens: int
    context_length: int
    #: The client gave no ``max_tokens``: only a prompt filling the whole context is refused, and it is
    #: the prompt (``prompt_param``) that is named, not a parameter the client never sent.
    defaulted: bool = False
    prompt_param: str = "messages"

    def record(self) -> dict[str, Any]:
        return {"admitted": False, "code": "context_length_exceeded", "prompt_tokens": self.prompt_tokens,
                "max_tokens": self.max_tokens, "context_length": self.context_length}

    def error(self) -> ApiError:
        if self.defaulted:
            return ApiError(400, "context_length_exceeded", f"The prompt is {self.prompt_tokens} tokens: it leaves "
                            f"no room for a completion in the model's context of {self.context_length} tokens.",
                            param=self.prompt_param)
        return ApiError(400, "context_length_exceeded", f"The prompt is {self.prompt_tokens} tokens and max_tokens "
                        f"is {self.max_tokens}: more than the model's context of {self.context_length} tokens.",
                        param="max_tokens")


@dataclass(frozen=True)
class UsageUnavailable:
    """The usage counters (Redis) could not be read or updated: no limit can be checked.

    The model's queue depth is read in the same script, so a Redis that
    cannot answer is this refusal, whichever of the two it failed to read.
    """

    message: str

    def record(self) -> dict[str, Any]:
        return {"admitted": False, "code": "usage_unavailable", "message": self.message}

    def error(self) -> ApiError:
        return ApiError(503, "usage_unavailable", USAGE_UNAVAILABLE_MESSAGE)


@dataclass(frozen=True)
class OverLimit:
    """A usage limit refused the reservation (it lifts after ``refusal.retry_after_s``)."""

    refusal: Refusal

    def record(self) -> dict[str, Any]:
        return {"admitted": False, "code": self.refusal.code, "refusal": self.refusal.to_dict()}

    def error(self) -> ApiError:
        never = f"its {self.refusal.scope.kind} limit {self.refusal.limit_name} is {self.refusal.limit}" \
            if self.refusal.never_fits else None  # no wait lifts it (the message says what it needs)
        return denial([Reason(code=self.refusal.code, message=self.refusal.message,
                              retry_after_s=self.refusal.retry_after_s)], never=never)


@dataclass(frozen=True)
class QueueFull:
    """As many requests as the gateway allows already wait for this model (fifo), or for this team's
    share of it (fair: ``places`` set)."""

    waiting: int
    limit: int
    model: str = ""
    team: str | None = None
    places: TeamPlaces | None = None

    def record(self) -> dict[str, Any]:
        record = {"admitted": False, "code": QUEUE_FULL, "waiting": self.waiting, "limit": self.limit}
        if self.places is not None:
            record["team"] = {"name": self.team, **self.places.to_dict(), "retry_after_s": self.retry_after_s()}
        return record

    def retry_after_s(self) -> int:
        """fifo: 1 s. Fair: the time for the team's places (or, at the ceiling, the model's) to free enough
        for one more job, served at its share of the model's live workers (gateway/limits/fair_share.py)."""
        places = self.places
        if places is None:
            return 1
        svc = places.service_ms if places.service_ms is not None else FALLBACK_SERVICE_MS
        if places.at_ceiling and places.waiting < places.cap:  # the team has room; the model has not
            return drain_wait_s(self.waiting - CEILING_FACTOR * self.limit + 1, svc, places.live_workers, 1.0)
        return drain_wait_s(places.waiting - places.cap + 1, svc, places.live_workers, places.share)

    def message(self) -> str:
        places = self.places
        if places is None:
            return f"{self.waiting} requests are already waiting for this model (limit {self.limit})"
        team = "(no team)" if self.team is None else self.team
        # "waiting, places" rather than "N of M places": a team's share may have shrunk (another team came)
        # after its jobs were queued, and "3 of 1 places" read as a miscount
        text = (f"model '{self.model}' queue, team {team}: {places.waiting} waiting, {places.cap} places (its "
                f"share, {_percent(places.share)} % of {self.limit}); {self.waiting} requests wait in all")
        if places.at_ceiling:
            text += f", the most all teams together may hold ({CEILING_FACTOR * self.limit})"
        return text

    def error(self) -> ApiError:
        return denial([Reason(code=QUEUE_FULL, message=self.message(), retry_after_s=self.retry_after_s())])


def _percent(fraction: float) -> str:
    """A share as people read it: ``50``, ``33``, ``0.5``."""
    value = fraction * 100
    return f"{value:.0f}" if value >= 1 else f"{value:.2g}"


#: Why an allowed request was still not admitted; ``record()`` is its audit entry's ``admission``.
@dataclass(frozen=True)
class ModelUnavailable:
    """The model has no live worker and its last worker could not load it (gateway/dispatch/model_health.py)."""

    model: str
    reason: str

    def record(self) -> dict[str, Any]:
        return {"admitted": False, "code": MODEL_UNAVAILABLE, "model": self.model, "reason": self.reason}

    def error(self) -> ApiError:
        return ApiError(503, MODEL_UNAVAILABLE, f"The model '{self.model}' cannot be served now: its worker could "
                        f"not load it ({self.reason}). Nothing was queued.",
                        headers={"Retry-After": str(MODEL_UNAVAILABLE_RETRY_S), **DO_NOT_RETRY})


AdmissionRefusal = Union[ContextTooLong, UsageUnavailable, OverLimit, QueueFull, ModelUnavailable]


def queue_lost() -> ApiError:
    """The answer to a request whose job Redis lost: nothing ran, nothing was charged, a retry is queued afresh."""
    return ApiError(503, QUEUE_LOST, "The request queue lost this request's job before a worker ran it (Redis "
                    "came back without its data). Nothing was generated or charged; try again.",
                    headers={"Retry-After": "1"})


def worker_error(result: JobResult) -> ApiError:
    code = result.error.get("code", "worker_error")
    if code == QUEUE_LOST:
        return queue_lost()
    message = result.error.get("message", "")
    if result.status == "timed_out" and code == "expired":  # never ran: a later try may find the queue shorter
        return ApiError(504, "timed_out", "The request expired in the queue before a worker could take it; "
                        "nothing was generated.")
    if result.status == "timed_out":  # the same request would run into the same limit: not worth a retry
        return ApiError(504, "timed_out", "The generation hit the worker's time limit; partial output was logged. "
                        "Ask for fewer tokens (max_tokens) rather than retrying unchanged.", headers=DO_NOT_RETRY)
    if result.status == "cancelled" and code == GATEWAY_GONE:  # its worker read this gateway's heartbeat as
        # stopped (Redis out of its reach for a while): nothing ran, another try is queued afresh
        return ApiError(503, "cancelled", "The request was not run: when a worker took it, this gateway had not "
                        "reached Redis for a while and was taken for gone. Nothing was generated; try again.",
                        headers={"Retry-After": "1"})
    if result.status == "cancelled":
        return ApiError(503, "cancelled", "The request was cancelled before it completed.")
    if code == "audit_unavailable":
        return ApiError(503, code, "The audit log cannot be written, so the output was withheld.")
    if code == OUTPUT_POLICY_UNAVAILABLE:  # capacity, as at admission: retryable, with Retry-After
        return ApiError(503, POLICY_UNAVAILABLE, f"The output was generated but withheld: {message}. The request "
                        "has been logged; try again shortly.", headers={"Retry-After": "1"})
    if code == OUTPUT_UNCHECKED:
        return ApiError(503, code, "The output could not be checked against the output rules in time, so it "
                        "was withheld; the request has been logged. Try again shortly.", headers={"Retry-After": "1"})
    if code == "context_length_exceeded":
        return ApiError(400, code, f"The request does not fit the model's context: {message}", param="messages")
    if code == "generation_failed":
        return ApiError(502, code, f"The model could not generate: {message}")
    if code == WORKER_LOST and message == STREAM_WORKER_LOST:  # died once: nothing says a second run would
        return ApiError(502, code, "The model worker generating this stream died; a stream cannot be resumed, so "
                        "what was sent is all there is. It has been logged; a retry may succeed.")
    if code == WORKER_LOST:
        return ApiError(502, code, "The model worker failed on this request; it has been logged. Its workers ended "
                        "while running it more than once, so it is not run again: do not retry it unchanged.",
                        headers=DO_NOT_RETRY)
    return ApiError(502, code, "The model worker failed on this request; it has been logged.")
