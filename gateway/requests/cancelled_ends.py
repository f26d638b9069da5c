"""How a request ends when it is called off before its answer: its client left, or the stopping gateway's drain cut it.

Split from ``gateway/requests/outcome.py`` so that these stop paths read in one place: a job still queued is
taken back and its request ended ``cancelled`` here (:func:`withdrawn_end`); one a worker runs is given
:data:`CUT_GRACE_S` after the drain's cut (:func:`cut_while_running`); one Redis could not be asked about is
ended in the database, late enough for the worker that takes it later to find that end (:func:`end_unreachable`,
:func:`end_cut_stream`). The functions take the :class:`~gateway.requests.outcome.TicketRunner` whose request
they end and read its parts (dispatcher, request log, settlements) when they run: tests swap some of them
after the runner is made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from redis.exceptions import RedisError

from audit import AuditEntry
from gateway.api_errors import CLIENT_CLOSED_STATUS, ApiError
from gateway.dispatch import ResultTimeout
from gateway.dispatch.queue import Queued
from gateway.drain import shutting_down
from gateway.limits.charge import used_tokens
from gateway.requests.ticket import Ticket
from workers.contract.jobs import ENDED_UNSEEN_AFTER_S, STATUS_CANCELLED, STATUS_TIMED_OUT, JobResult
from workers.contract.privacy import Digester, logged_output

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)

#: Terminal kinds that end a request without an answer of its own: a timeout that lost to one keeps its 504.
GAVE_UP = frozenset({STATUS_TIMED_OUT, STATUS_CANCELLED})
#: The error of the end the gateway records for a request whose client left while its job still waited.
_GONE_WHILE_QUEUED = {"code": "cancelled", "message": "the client went away before a worker took the request"}

#: The same, for a request its stopping gateway ended (``gateway/drain.py``).
_STOPPED_WHILE_QUEUED = {"code": "cancelled", "message": "the gateway stopped before a worker took the request"}
#: After the drain's cut, how long a non-streamed request whose job a worker runs waits for that worker to stop
#: at the cancel key and record the end (within the drain's own ``END_WAIT_S``).
CUT_GRACE_S = 3.0
#: How long after its job was queued, at the least, the gateway records the end of a request whose job it
#: could not take back or flag (Redis unreachable): three times the wait past which a worker's first run
#: asks the database for an end (:data:`ENDED_UNSEEN_AFTER_S`), so that it does even across 2 s of skew
#: between the two clocks. The cut's grace (:data:`CUT_GRACE_S`) has usually passed it already.
UNSEEN_END_AGE_S = 3 * ENDED_UNSEEN_AFTER_S


@dataclass(frozen=True)
class Answered:
    """A request's answer, made while the drain ended it (:func:`cut_while_running`)."""

    result: JobResult


async def cut_while_running(runner: TicketRunner, ticket: Ticket, waiting: asyncio.Future[Any], queued: Queued,
                            *, unreachable: bool = False,
                            hurried: Callable[[], Awaitable[Any]] | None = None) -> Answered:
    """The drain ended a request whose job a worker runs: its answer if the generation ends within
    :data:`CUT_GRACE_S` (it stops at the cancel key and records ``cancelled``, answered 503
    ``shutting_down``; one that had just finished is served), else 503 ``shutting_down`` at once, its
    worker recording the end (whose usage any gateway settles then: README, "Crashes").

    ``unreachable``: Redis did not answer the withdrawal, so the job may as well still be queued, and
    nothing stops it (its cancel key could not be written): with no answer in the grace its end is
    recorded here (:func:`end_unreachable`).

    ``hurried``: returns once the stop is forced (``Drain.wait_hurried``), which ends the grace: a forced stop
    waits for the ended requests' answers less than the grace, and a client whose worker did not stop in
    time (a long prefill) got no answer at all (probe q1 F1).
    """
    hurry = asyncio.ensure_future(hurried()) if hurried is not None else None
    try:
        await asyncio.wait({waiting} if hurry is None else {waiting, hurry}, timeout=CUT_GRACE_S,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if hurry is not None:
            hurry.cancel()
    if not waiting.done() or (unreachable and _lost_redis(waiting)):
        waiting.cancel()
        if unreachable:
            return await end_unreachable(runner, ticket, queued)
        raise shutting_down(in_flight=True)
    meta = waiting.result()
    try:
        if isinstance(meta, JobResult):  # handed over: recorded here
            return Answered(await runner.ended(ticket, meta))
        return Answered(await runner.result_of(ticket, meta))
    except ApiError as error:
        if error.code == STATUS_CANCELLED:
            raise shutting_down(in_flight=True) from None
        raise


async def end_unreachable(runner: TicketRunner, ticket: Ticket, queued: Queued) -> Answered:
    """End a non-streamed request the drain cut while Redis could not be reached (:func:`_end_unreached`):
    503 ``shutting_down``, or the answer of a worker's end that came first (as for a timeout).

    The reservation is released, to what the end records (retried until the gateway stops; then the
    gateway that follows settles it from this end once the worker names it: nothing charged). A
    database that refuses the entry too leaves nothing to stop the job: the client is told so
    (:func:`shutting_down`, ``unrecorded``), not that it was cancelled, and the reservation stays held,
    so that the run that follows is charged what it records (as a timeout whose stop Redis did not
    take is charged, not freed).
    """
    ended = await _end_unreached(runner, ticket, queued)
    if isinstance(ended, AuditEntry):
        if ended.kind not in GAVE_UP:  # a worker's end came first: it answers
            return Answered(await runner.answered_by(ticket, ended))
        await runner.settlements.settle(ticket, used_tokens(ended.body.get("usage")))
    raise shutting_down(in_flight=True, unrecorded=ended is False)


async def end_cut_stream(runner: TicketRunner, ticket: Ticket, queued: Queued) -> bool | None:
    """End a stream the drain cut before any of its text came here and now (:func:`_end_unreached`):
    its job taken back if still queued, or, Redis unreachable, its end recorded in the database, rather
    than in :meth:`TicketRunner.abandon`'s wait: that wait is for an outcome Redis would carry, and the stopping
    gateway cancels it a moment later, so the request was left with no end and its job ran at the next
    start (probe p1 F1). True: ended (recorded, its usage settled);
    False: neither Redis nor the database could be reached (its reservation stays held, as in
    :func:`end_unreachable`); None: Redis answered and a worker has the job: it records the end, and the
    stream is abandoned as usual."""
    ended = await _end_unreached(runner, ticket, queued)
    if isinstance(ended, AuditEntry):
        await runner.settlements.settle(ticket, used_tokens(ended.body.get("usage")))
        return True
    return ended


async def _end_unreached(runner: TicketRunner, ticket: Ticket, queued: Queued) -> AuditEntry | bool | None:
    """End a request the drain cut whose job Redis could not be asked to give back (probe p1 F1).

    Its job could be neither taken back nor flagged, and would run (and be charged) once Redis is back
    with it: a stop that took Redis down with the API. Redis is asked once more (it may be back): a job
    taken back ends as any withdrawn one (True); one a worker has now stops at its cancel key, written
    just before, and its worker records the end (None). Still no answer: the gateway records
    ``cancelled`` in the database (still up) itself, no sooner than :data:`UNSEEN_END_AGE_S` after the
    job was queued, so that the worker that takes the job later asks the database before it generates,
    finds this end and answers from it (``workers/generation.py``, ``ENDED_UNSEEN_AFTER_S``); the entry
    that ended the request is returned (this one, or a worker's that won the unique terminal constraint).
    False: the database refused it too (and keeping it pending needs Redis): nothing will stop the job.
    """
    await runner.request_cancel(ticket.request_id)
    withdrawn = await runner.dispatcher.withdraw(queued)
    if withdrawn:
        await withdrawn_end(runner, ticket, stopped=True)
        return True
    if withdrawn is not None:
        return None
    await until_aged(queued)
    winner = await runner.request_log.end(ticket, "cancelled",
                                          gone_while_queued(ticket, runner.digester, stopped=True))
    if winner is None:
        log.error("request %s: its job could not be cancelled (Redis unreachable) nor its end recorded (the "
                  "audit store refused it); it may run once Redis is back", ticket.request_id)
        return False
    return winner


def gone_while_queued(ticket: Ticket, digester: Digester, *, stopped: bool = False) -> dict[str, Any]:
    """The body of a request ended before a worker took it: no output, as its ``prompt_logging`` keeps
    one (under ``hash`` a digest and a length, no payload; it was ``"output": ""`` whatever the level).
    ``stopped``: ended by its stopping gateway's drain, not by its client."""
    job = ticket.job
    error = _STOPPED_WHILE_QUEUED if stopped else _GONE_WHILE_QUEUED
    return {**logged_output("", job.prompt_logging, job.redact, digester), "error": dict(error)}


async def withdrawn_end(runner: TicketRunner, ticket: Ticket, *, stopped: bool = False) -> ApiError:
    """End a request whose job was taken back from the queue: ``cancelled``, nothing used (unless an
    end was recorded before: a run that died after recording it, its job restored to the queue, is
    charged what that end records); the error to raise (its client is gone; ``stopped``: the drain
    ended it, and its client is told 503 ``shutting_down``)."""
    if runner.output_rules is not None:  # a cancelled verdict may have gone out for it: no worker reads it now
        await runner.output_rules.discard(ticket.request_id)
    winner = await runner.request_log.end(ticket, "cancelled",
                                          gone_while_queued(ticket, runner.digester, stopped=stopped))
    await runner.settlements.settle(ticket, used_tokens(winner.body.get("usage")) if winner is not None else None)
    if stopped:
        return shutting_down(in_flight=True)
    # 499, not a 5xx: the client went away (the metrics count it with the client's errors)
    return ApiError(CLIENT_CLOSED_STATUS, "cancelled", "The request was cancelled before it completed.")


def _lost_redis(waiting: asyncio.Future[Any]) -> bool:
    """Whether a finished wait for an outcome failed because Redis went away (not its request timeout)."""
    if waiting.cancelled():
        return False
    exc = waiting.exception()
    return isinstance(exc, (RedisError, OSError)) and not isinstance(exc, ResultTimeout)


async def until_aged(queued: Queued) -> None:
    """Wait until ``queued``'s job has waited :data:`UNSEEN_END_AGE_S` since it was queued (at once, mostly)."""
    if not queued.enqueued_at_ns:
        return
    left_s = UNSEEN_END_AGE_S - (time.time_ns() - queued.enqueued_at_ns) / 1e9
    if left_s > 0:
        await asyncio.sleep(left_s)

