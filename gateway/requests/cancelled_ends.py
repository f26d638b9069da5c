"""How a request ends when it is called off before its answer: its client left, the stopping gateway's drain cut
it, or its key was revoked (the reasons and their words: ``gateway/requests/call_off.py``).

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
from gateway.api_errors import ApiError
from gateway.dispatch import ResultTimeout
from gateway.dispatch.queue import Queued
from gateway.limits.charge import used_tokens
from gateway.requests.call_off import CLIENT_GONE, STOPPING, CallOff
from gateway.requests.ticket import Ticket
from workers.contract.jobs import ENDED_UNSEEN_AFTER_S, STATUS_CANCELLED, STATUS_TIMED_OUT, JobResult
from workers.contract.privacy import Digester, logged_output

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)

#: Terminal kinds that end a request without an answer of its own: a timeout that lost to one keeps its 504.
GAVE_UP = frozenset({STATUS_TIMED_OUT, STATUS_CANCELLED})
#: After the drain's cut (or a key's revocation), how long a non-streamed request whose job a worker runs waits for that worker to stop
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
                            hurried: Callable[[], Awaitable[Any]] | None = None, why: CallOff = STOPPING) -> Answered:
    """The drain (``why``: or the key's revocation) ended a request whose job a worker runs: its answer if the
    generation ends within :data:`CUT_GRACE_S` (it stops at the cancel key and records ``cancelled``, answered
    ``why``'s error: 503 ``shutting_down``; one that had just finished is served), else that error at once, its
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
            return await end_unreachable(runner, ticket, queued, why)
        raise why.answer()
    meta = waiting.result()
    try:
        if isinstance(meta, JobResult):  # handed over: recorded here
            return Answered(await runner.ended(ticket, meta))
        return Answered(await runner.result_of(ticket, meta))
    except ApiError as error:
        if error.code == STATUS_CANCELLED:
            raise why.answer() from None
        raise


async def end_unreachable(runner: TicketRunner, ticket: Ticket, queued: Queued, why: CallOff = STOPPING) -> Answered:
    """End a non-streamed request the drain cut while Redis could not be reached (:func:`_end_unreached`):
    ``why``'s error (503 ``shutting_down``), or the answer of a worker's end that came first (as for a timeout).

    The reservation is released, to what the end records (retried until the gateway stops; then the
    gateway that follows settles it from this end once the worker names it: nothing charged). A
    database that refuses the entry too leaves nothing to stop the job: the client is told so
    (``why``'s error, ``unrecorded``), not that it was cancelled, and the reservation stays held,
    so that the run that follows is charged what it records (as a timeout whose stop Redis did not
    take is charged, not freed).
    """
    ended = await _end_unreached(runner, ticket, queued, why)
    if isinstance(ended, AuditEntry):
        if ended.kind not in GAVE_UP:  # a worker's end came first: it answers
            return Answered(await runner.answered_by(ticket, ended))
        await runner.settlements.settle(ticket, used_tokens(ended.body.get("usage")))
    raise why.answer(unrecorded=ended is False)


async def end_cut_stream(runner: TicketRunner, ticket: Ticket, queued: Queued,
                         why: CallOff = STOPPING) -> bool | None:
    """End a stream the drain cut before any of its text came here and now (:func:`_end_unreached`):
    its job taken back if still queued, or, Redis unreachable, its end recorded in the database, rather
    than in :meth:`TicketRunner.abandon`'s wait: that wait is for an outcome Redis would carry, and the stopping
    gateway cancels it a moment later, so the request was left with no end and its job ran at the next
    start (probe p1 F1). True: ended (recorded, its usage settled);
    False: neither Redis nor the database could be reached (its reservation stays held, as in
    :func:`end_unreachable`); None: Redis answered and a worker has the job: it records the end, and the
    stream is abandoned as usual. ``why``: the drain's cut, or the key's revocation."""
    ended = await _end_unreached(runner, ticket, queued, why)
    if isinstance(ended, AuditEntry):
        await runner.settlements.settle(ticket, used_tokens(ended.body.get("usage")))
        return True
    return ended


async def _end_unreached(runner: TicketRunner, ticket: Ticket, queued: Queued,
                         why: CallOff) -> AuditEntry | bool | None:
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
    await runner.request_cancel(ticket.request_id, why.cancel_value)
    withdrawn = await runner.dispatcher.withdraw(queued)
    if withdrawn:
        await withdrawn_end(runner, ticket, why)
        return True
    if withdrawn is not None:
        return None
    await until_aged(queued)
    winner = await runner.request_log.end(ticket, "cancelled",
                                          gone_while_queued(ticket, runner.digester, why))
    if winner is None:
        log.error("request %s: its job could not be cancelled (Redis unreachable) nor its end recorded (the "
                  "audit store refused it); it may run once Redis is back", ticket.request_id)
        return False
    return winner


def gone_while_queued(ticket: Ticket, digester: Digester, why: CallOff = CLIENT_GONE) -> dict[str, Any]:
    """The body of a request ended before a worker took it: no output, as its ``prompt_logging`` keeps
    one (under ``hash`` a digest and a length, no payload; it was ``"output": ""`` whatever the level).
    ``why``: what ended it (its client by default; its stopping gateway's drain, its key's revocation)."""
    job = ticket.job
    return {**logged_output("", job.prompt_logging, job.redact, digester), "error": why.queued_end()}


async def withdrawn_end(runner: TicketRunner, ticket: Ticket, why: CallOff = CLIENT_GONE) -> ApiError:
    """End a request whose job was taken back from the queue: ``cancelled``, nothing used (unless an
    end was recorded before: a run that died after recording it, its job restored to the queue, is
    charged what that end records); the error to raise, ``why``'s (its client is gone, a 499 nobody
    reads; the drain ended it: 503 ``shutting_down``; its key was revoked: 401 ``invalid_api_key``)."""
    if runner.output_rules is not None:  # a cancelled verdict may have gone out for it: no worker reads it now
        await runner.output_rules.discard(ticket.request_id)
    winner = await runner.request_log.end(ticket, "cancelled",
                                          gone_while_queued(ticket, runner.digester, why))
    await runner.settlements.settle(ticket, used_tokens(winner.body.get("usage")) if winner is not None else None)
    return why.answer()


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

