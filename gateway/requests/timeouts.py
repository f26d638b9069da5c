"""How a request ends when its timeout runs out: the job is asked to stop, a begun one given a grace, the end recorded.

Split from ``gateway/requests/outcome.py`` so that the timeout's path reads in one place, for both kinds of
request: a non-streamed one's wait (:func:`after_timeout`) and a stream's relay
(``gateway/requests/stream_events.py``) both stop the job (:func:`stop_for_timeout`), give a worker that began
it the grace (``GOVGATE_TIMEOUT_GRACE_S``, default :data:`STOP_GRACE_S`) to report what it generated, and end
the request (:func:`timed_out`): 504, charged what the worker reports, nothing if no worker began the job, its
whole reservation if one began and said nothing.
The functions take the :class:`~gateway.requests.outcome.TicketRunner` whose request timed out (or the one part
of it they need) and read its parts when they run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.api_errors import ApiError
from gateway.dispatch import ResultTimeout
from gateway.dispatch.queue import Queued
from gateway.dispatch.results import PendingResult
from gateway.limits.charge import used_tokens
from gateway.observability.metrics import observe_result
from gateway.requests.cancelled_ends import GAVE_UP
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.ticket import Ticket
from workers.contract.jobs import CANCEL_TTL_S, JOB_LOOK_AGAIN, JOB_STARTED, STOP_TIMED_OUT, JobResult, cancel_key
from workers.contract.output_check import OutputVerdict, logged_client_output
from workers.contract.privacy import logged_output
from workers.contract.terminal_body import judged_fields

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)

#: How long, once its request timeout ran out, the gateway waits for the worker that began the job to stop
#: and report what it generated (it looks at the stop between tokens, every 50 ms at most); with no report by
#: then the request is charged its whole reservation (:func:`timed_out`). The default of
#: ``GOVGATE_TIMEOUT_GRACE_S`` (the runner holds the setting as ``stop_grace_s``).
STOP_GRACE_S = 10.0


async def after_timeout(runner: TicketRunner, ticket: Ticket, pending: PendingResult, hold: HoldBack | None,
                        queued: Queued | None = None) -> JobResult:
    """A non-streamed request's wait ran out: stop its job, give a begun one its grace, end the request."""
    started = await stop_for_timeout(runner.redis, ticket)
    if not started:
        await runner.withdraw_unstarted(queued)
    outcome: dict[str, Any] | JobResult | None = None
    if started:
        try:
            outcome = await runner.wait_for_outcome(ticket, pending, hold, runner.stop_grace_s)
        except (ResultTimeout, RedisError, OSError):
            outcome = None
    return await timed_out(runner, ticket, started=started, outcome=outcome)


async def stop_for_timeout(redis: aioredis.Redis, ticket: Ticket) -> bool:
    """Ask the job to stop because the request timed out; whether a worker may have begun it.

    One ``SET … GET`` of the job's state key, as the worker's start claim
    does, so exactly one of them comes first: a job not begun yet (no state,
    or a look-again mark) is never generated (its worker sees the stop at
    its start); ``started`` means a worker generates, or did. An earlier
    stop (the output rules', a client gone) is written back, so its reason
    stands; the worker's generation may then have begun too. Redis failing
    here: unknown, so begun (the request is then charged, not freed).
    """
    key = cancel_key(ticket.request_id)
    try:
        was = await redis.set(key, STOP_TIMED_OUT, ex=CANCEL_TTL_S, get=True)
        if was not in (None, JOB_LOOK_AGAIN, STOP_TIMED_OUT) and was != JOB_STARTED:
            await redis.set(key, was, ex=CANCEL_TTL_S)
    except (RedisError, OSError) as exc:
        log.warning("cannot ask %s to stop at its timeout: %s", ticket.request_id, exc)
        return True
    return was not in (None, JOB_LOOK_AGAIN)


async def tell_timed_out(output_rules: OutputRules | None, ticket: Ticket, hold: HoldBack | None,
                         delivered: str) -> OutputVerdict | None:
    """Tell a checked stream's worker, before the stop (:func:`stop_for_timeout`), that the request timed
    out and what its client received (``delivered``): the ``cancelled`` verdict marked ``timed_out``
    (:meth:`OutputRules.cancelled`). The worker, stopping at the key (or waiting for a verdict on an
    output it finished), records ``timed_out`` with that ``client_output`` and the decision, as a
    cancelled stream's entry has them (p2 #3: it had neither). Returns the verdict; None when there is
    nothing to tell: an unchecked stream, or one the output rules stopped already, whose worker reports
    and waits for its verdict as usual (the stop's reason stands: :func:`stop_for_timeout`).
    """
    if hold is None or output_rules is None or hold.stopped:
        return None
    return await output_rules.cancelled(ticket, hold, client_text=delivered, timed_out=True)


async def timed_out(runner: TicketRunner, ticket: Ticket, *, output: str | None = None, started: bool = False,
                    outcome: dict[str, Any] | JobResult | None = None,
                    verdict: OutputVerdict | None = None) -> JobResult:
    """The wait ran out and the job was asked to stop (:func:`stop_for_timeout`): end the request, 504.

    ``started``: a worker may have begun the job; ``outcome``: what it
    reported within the grace that followed (the runner's ``stop_grace_s``). A
    worker that stopped records the end itself, ``timed_out`` with what it
    generated: that entry is the request's end, it is charged and counted
    what it records, and the client gets the 504. An outcome that is a
    completion (it finished just then) or a failure answers as it would
    have before the timeout.

    With no outcome the gateway records ``timed_out`` itself. ``output`` is
    what a stream already sent to its client; ``verdict``: the one a
    checked stream's worker was told (:func:`tell_timed_out`), whose
    decision and ``client_output`` the entry keeps as the worker's would. A job no worker began is
    charged nothing (its worker, if one takes it, sees the stop at its
    start). One a worker began but did not report on in the grace (frozen,
    or deep in a long prompt) is charged its whole reservation, and the
    entry's ``usage`` says so (``"basis": "reservation"``): the model ran,
    and what it used is not known. If another end won the unique
    terminal constraint (the worker's, a handed-over output's fallback
    written by a retry, a lost-request sweep), that entry is the request's
    answer: usage is settled to what it records, and the client gets its
    completion or the error it records, as if the worker's result had
    arrived. A winner that is itself a timeout or a cancel keeps the 504.
    """
    if outcome is not None:
        return await _reported_in_grace(runner, ticket, outcome)
    job = ticket.job
    body: dict[str, Any] = {"error": {"code": "timed_out",
                                      "message": f"no result within {runner.request_timeout_s:g}s"}}
    if output is not None:  # kept as the request's prompt_logging allows, like a worker's output
        body.update(logged_output(output, job.prompt_logging, job.redact, runner.digester))
    if verdict is not None:  # released text only, masked already: no finding of the rules' in clear
        body.update(judged_fields(job, verdict, runner.digester))
    elif output is not None:  # an unchecked stream: what it sent is what its client received, said so
        body.update(logged_client_output(output, job.prompt_logging, job.redact, runner.digester))
    reserved = _reserved_usage(ticket) if started else None
    if reserved is not None:
        body["usage"] = reserved
        body["error"]["message"] += (f"; its worker did not report what it generated within "
                                     f"{runner.stop_grace_s:g}s, so it is charged what it reserved")
    winner = await runner.request_log.end(ticket, "timed_out", body)
    if winner is not None and winner.kind not in GAVE_UP:
        return await runner.answered_by(ticket, winner)
    # This timeout's own entry (nothing used if no worker began the job, else the reservation), one
    # written earlier (a worker's time limit or stop, a cancel, with what it generated), or none
    # (refused by the database, kept pending: charged as that entry says).
    usage = winner.body.get("usage") if winner is not None else reserved
    await runner.settlements.settle(ticket, used_tokens(usage) if usage is not None else None)
    raise timeout_error(runner.request_timeout_s)


async def _reported_in_grace(runner: TicketRunner, ticket: Ticket,
                            outcome: dict[str, Any] | JobResult) -> JobResult:
    """The outcome a worker reported in the grace after the timeout: its end (recorded by it, or here
    for a handed-over output) is the request's, charged and counted what it records."""
    if isinstance(outcome, JobResult):  # handed over: recorded here
        return await runner.ended(ticket, outcome)
    if outcome.get("status") == "SUCCESS" and isinstance(outcome.get("result"), dict):
        result = JobResult.from_payload(outcome["result"])
        if result.status in GAVE_UP and result.audit_seq is not None:  # stopped, its end recorded
            observe_result(ticket.model, result.prompt_tokens, result.completion_tokens, result.queue_ms)
            await runner.settlements.settle(ticket, result.prompt_tokens + result.completion_tokens)
            raise timeout_error(runner.request_timeout_s)
    return await runner.result_of(ticket, outcome)


def timeout_error(request_timeout_s: float) -> ApiError:
    """The 504 of a request whose timeout ran out."""
    return ApiError(504, "timed_out", f"The model did not answer within {request_timeout_s:g} seconds.")


def _reserved_usage(ticket: Ticket) -> dict[str, Any] | None:
    """What a request reserved, as the ``usage`` of an end that charges it in full (None: nothing reserved).

    The reservation is the prompt's tokens as held at admission plus
    ``max_tokens``; ``basis`` tells these figures from a worker's counts.
    """
    reservation = ticket.reservation
    if reservation is None:
        return None
    completion = max(0, min(ticket.job.params.max_tokens, reservation.tokens))
    return {"prompt_tokens": reservation.tokens - completion, "completion_tokens": completion,
            "total_tokens": reservation.tokens, "basis": "reservation"}
