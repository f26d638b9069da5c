"""Everything after admission: queue the job, wait or stream, cancel, time out, settle, record the end.

Every exit leaves exactly one terminal entry: written by the worker
(completion or failure), here for an output the worker handed over under
the output rules (``gateway/requests/handed_over.py``), or here when the
worker cannot be reached or took too long (failed or timed_out); the
database's unique constraint settles any race. Usage is settled on every exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditEntry
from gateway.dispatch import Dispatcher, QueueUnavailable, ResultTimeout, ResultWaiter
from gateway.dispatch.queue import NoPlace, Queued
from gateway.dispatch.results import FoundFallback, PendingResult
from gateway.api_errors import CLIENT_CLOSED_STATUS, ApiError
from gateway.drain import Cut, Drain, shutting_down
from gateway.limits import UsageCounters
from gateway.limits.charge import used_tokens
from gateway.observability.metrics import observe_result
from gateway.requests.fallback_drops import FallbackDrops
from gateway.requests.handed_over import HandedOver, handed_over_tokens
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.refusals import QUEUE_FULL, QUEUE_UNAVAILABLE_MESSAGE, QueueFull, worker_error
from gateway.requests.request_log import RequestLog
from gateway.requests.ticket import Ticket
from gateway.requests.usage import settle_reservation, undo_reservation
from workers.contract.jobs import (CANCEL_TTL_S, ENDED_UNSEEN_AFTER_S, JOB_LOOK_AGAIN, JOB_STARTED, STATUS_CANCELLED,
                                  STATUS_COMPLETED, STATUS_TIMED_OUT, STOP_TIMED_OUT, JobResult, cancel_key)
from workers.contract.output_check import (STOP_CONTENT_FILTER, OutputReport, OutputVerdict, decision_record,
                                           logged_client_output)
from workers.contract.privacy import Digester, logged_output

log = logging.getLogger(__name__)

#: Terminal kinds that end a request without an answer of its own: a timeout that lost to one keeps its 504.
_GAVE_UP = frozenset({STATUS_TIMED_OUT, STATUS_CANCELLED})
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
#: How long, once its request timeout ran out, the gateway waits for the worker that began the job to stop
#: and report what it generated (it looks at the stop between tokens, every 50 ms at most); with no report by
#: then the request is charged its whole reservation (:meth:`TicketRunner.timed_out`).
STOP_GRACE_S = 10.0

#: Returns once the client has gone away (its connection closed); see :meth:`TicketRunner.complete`.
ClientGone = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class _Answered:
    """A request's answer, made while the drain ended it (:meth:`TicketRunner._cut_while_running`)."""

    result: JobResult


class TicketRunner:
    """Runs admitted tickets to their end: a result, or a designed :class:`ApiError`."""

    def __init__(self, *, dispatcher: Dispatcher, waiter: ResultWaiter, redis: aioredis.Redis,
                 counters: UsageCounters, request_log: RequestLog, digester: Digester,
                 request_timeout_s: float, output_rules: OutputRules | None = None,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self.dispatcher = dispatcher
        self.waiter = waiter
        self.redis = redis
        self.counters = counters
        self.request_log = request_log
        self.digester = digester
        self.request_timeout_s = request_timeout_s
        #: How long a timed-out job that a worker began is given to stop and report (:data:`STOP_GRACE_S`).
        self.stop_grace_s = stop_grace_s
        #: The output rules (None: outputs are not checked; jobs say so to their workers).
        self.output_rules = output_rules
        #: Records the outputs workers hand over (non-streamed, under the output rules).
        self.handed_over = HandedOver(rules=output_rules, request_log=request_log, drops=FallbackDrops(redis),
                                      digester=digester) if output_rules is not None else None
        self._background: set[asyncio.Task] = set()
        #: Settlements begun ahead of their request's end (:meth:`_settle_ahead`), by request id.
        self._settling: dict[str, asyncio.Task[None]] = {}

    async def complete(self, ticket: Ticket, gone: ClientGone | None = None,
                       cut: ClientGone | None = None, stopping: Drain | None = None) -> JobResult:
        """Queue the job and wait for its result (judging its output on the way, under output rules).

        ``gone`` returns when the client has gone away: then the worker is asked
        to stop (the cancel key), and a job no worker has taken yet is taken back
        from the queue at once, so that its place and its reservation are free
        now rather than when a worker would have reached it; the request ends
        ``cancelled``, recorded here (:meth:`_withdrawn_end`).
        ``cut`` returns when the stopping gateway's drain time is over (``gateway/drain.py``): the job is
        cancelled the same way, and the client is answered 503 ``shutting_down`` (:meth:`_unless_gone`).
        ``stopping``: that drain, whose cut also ends the request before its job is queued (:meth:`_rule_absent`).
        """
        # A revision with no output rule passes every output whole: the worker records that verdict
        # itself, and the round trip of report and verdict is skipped (a stream's hold-back too: open_stream).
        unruled = await self._rule_absent(ticket, stopping)
        checked = self.output_rules is not None and not unruled
        try:
            try:
                async with self.waiter.expect(ticket.request_id, checked=checked, handed_over=checked) as pending:
                    queued = await self._enqueue(ticket, output_rule_absent=unruled, gateway_records=checked)
                    hold = self.output_rules.hold() if self.output_rules is not None and checked else None
                    try:
                        outcome = self._outcome(ticket, pending, hold, self.request_timeout_s)
                        meta = await self._unless_gone(ticket, queued, outcome, gone, cut)
                    except ResultTimeout:  # before OSError: TimeoutError is one. Still subscribed: the
                        # worker's report of what it generated is heard
                        return await self._after_timeout(ticket, pending, hold, queued)
            except NoPlace as exc:
                raise await self.no_place(ticket, exc) from None
            except (QueueUnavailable, RedisError, OSError) as exc:
                raise await self.queue_down(ticket, exc) from None
            if isinstance(meta, _Answered):  # ended by the drain, answered already
                return meta.result
            if isinstance(meta, JobResult):  # handed over: recorded here
                return await self.ended(ticket, meta)
            return await self.result_of(ticket, meta)
        finally:
            self._forget_settlement(ticket)

    def _outcome(self, ticket: Ticket, pending: PendingResult, hold: HoldBack | None,
                 timeout_s: float) -> Awaitable[dict[str, Any] | JobResult]:
        """The wait for a non-streamed job's outcome (``hold``: under output rules, judged on the way)."""
        if hold is None:
            return pending.get(timeout_s)
        return self._judged_outcome(ticket, pending, hold, timeout_s=timeout_s)

    async def _after_timeout(self, ticket: Ticket, pending: PendingResult, hold: HoldBack | None,
                             queued: Queued | None = None) -> JobResult:
        """A non-streamed request's wait ran out: stop its job, give a begun one its grace, end the request."""
        started = await self.stop_for_timeout(ticket)
        if not started:
            await self.withdraw_unstarted(queued)
        outcome: dict[str, Any] | JobResult | None = None
        if started:
            try:
                outcome = await self._outcome(ticket, pending, hold, self.stop_grace_s)
            except (ResultTimeout, RedisError, OSError):
                outcome = None
        return await self.timed_out(ticket, started=started, outcome=outcome)

    async def withdraw_unstarted(self, queued: Queued | None) -> None:
        """Take back from its queue a job its request timed out before any worker began: its place (and
        its team's waiting count) was held until a worker reached the dead job, a frozen worker's never,
        and other requests were refused ``queue_full`` meanwhile (probe p2). A worker that takes it anyway
        sees the stop at its start; a Redis that cannot answer leaves it to that."""
        if queued is not None:
            await self.dispatcher.withdraw(queued)

    async def stop_for_timeout(self, ticket: Ticket) -> bool:
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
            was = await self.redis.set(key, STOP_TIMED_OUT, ex=CANCEL_TTL_S, get=True)
            if was not in (None, JOB_LOOK_AGAIN, STOP_TIMED_OUT) and was != JOB_STARTED:
                await self.redis.set(key, was, ex=CANCEL_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("cannot ask %s to stop at its timeout: %s", ticket.request_id, exc)
            return True
        return was not in (None, JOB_LOOK_AGAIN)

    async def _rule_absent(self, ticket: Ticket, stopping: Drain | None) -> bool:
        """Whether ``ticket``'s policy revision has no output rule (:meth:`OutputRules.rule_absent`; False
        without output rules). The probe, the last wait before the job is queued, ends at ``stopping``'s
        cut, as does a cut that came before it: the admitted request is ended ``cancelled`` here, its
        reservation released, 503 ``shutting_down``. Before (probe q1 F1), a forced stop left it with no
        answer and no end, its reservation and in-flight count held until the lost-request sweep."""
        rules = self.output_rules
        if rules is None:
            return False
        if stopping is None:
            return await rules.rule_absent(ticket)
        try:
            return await stopping.unless_cut(lambda: rules.rule_absent(ticket))
        except Cut:
            raise await self._withdrawn_end(ticket, stopped=True) from None

    async def open_stream(self, ticket: Ticket, stopping: Drain | None = None) -> StreamEvents:
        """Queue a streaming job and return its events; queueing errors are raised here, before any byte.

        Under a policy revision with no output rule the stream has nothing to hold its text back for:
        its pieces go out as they come, and its worker records the "allow, whole" verdict itself, as for
        a non-streamed completion. ``stopping``: as for :meth:`complete`.
        """
        unruled = await self._rule_absent(ticket, stopping)
        checked = self.output_rules is not None and not unruled
        async with contextlib.AsyncExitStack() as stack:
            try:
                pending = await stack.enter_async_context(self.waiter.expect(ticket.request_id, stream=True,
                                                                             checked=checked))
                queued = await self._enqueue(ticket, output_rule_absent=unruled)
            except NoPlace as exc:
                raise await self.no_place(ticket, exc) from None
            except (QueueUnavailable, RedisError, OSError) as exc:
                raise await self.queue_down(ticket, exc) from None
            return StreamEvents(self, ticket, pending, stack.pop_all(), checked=checked, queued=queued)

    async def _enqueue(self, ticket: Ticket, *, output_rule_absent: bool = False,
                       gateway_records: bool = False) -> Queued:
        job = replace(ticket.job, enqueued_at_ns=time.time_ns(), reply_to=self.waiter.reply_channel,
                      check_output=self.output_rules is not None, output_rule_absent=output_rule_absent,
                      gateway_records=gateway_records)
        return await self.dispatcher.enqueue(job, priority=ticket.priority, check=ticket.place_check)

    async def _unless_gone(self, ticket: Ticket, queued: Queued, outcome: Awaitable[Any],
                           gone: ClientGone | None, cut: ClientGone | None = None) -> Any:
        """``outcome``'s value, unless the client goes away first, or the drain ends the request
        (see :meth:`complete`).

        A job taken back from the queue ends here (:class:`ApiError` ``cancelled``,
        which nobody reads; ``shutting_down`` after a cut); one a worker already has is still
        waited for: the worker stops at the cancel key and records the end, settled as usual.
        After a cut that wait is short (:data:`CUT_GRACE_S`: the gateway is stopping), and its
        answer is the 503 unless the generation ended first.
        """
        if gone is None and cut is None:
            return await outcome
        waiting = asyncio.ensure_future(outcome)
        watching = [asyncio.ensure_future(watch()) for watch in (gone, cut) if watch is not None]
        cutting = watching[-1] if cut is not None else None
        try:
            while True:
                await asyncio.wait({waiting, *watching}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    return await waiting
                ended = [task for task in watching if task.done()]
                if any(not task.cancelled() and task.exception() is None for task in ended):
                    break
                watching = [task for task in watching if not task.done()]  # a watch that failed: wait without it
                if not watching:
                    return await waiting
            stopped = cutting is not None and cutting.done() and not cutting.cancelled() \
                and cutting.exception() is None
            await self._request_cancel(ticket.request_id)
            withdrawn = await self.dispatcher.withdraw(queued)
            if not withdrawn:
                if not stopped:
                    return await waiting
                return await self._cut_while_running(ticket, waiting, queued, unreachable=withdrawn is None)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
            raise await self._withdrawn_end(ticket, stopped=stopped)
        finally:
            for task in (waiting, *watching):
                task.cancel()

    async def _cut_while_running(self, ticket: Ticket, waiting: asyncio.Future[Any], queued: Queued, *,
                                 unreachable: bool = False) -> "_Answered":
        """The drain ended a request whose job a worker runs: its answer if the generation ends within
        :data:`CUT_GRACE_S` (it stops at the cancel key and records ``cancelled``, answered 503
        ``shutting_down``; one that had just finished is served), else 503 ``shutting_down`` at once, its
        worker recording the end (whose usage any gateway settles then: README, "Crashes").

        ``unreachable``: Redis did not answer the withdrawal, so the job may as well still be queued, and
        nothing stops it (its cancel key could not be written): with no answer in the grace its end is
        recorded here (:meth:`_end_unreachable`).
        """
        done, _ = await asyncio.wait({waiting}, timeout=CUT_GRACE_S)
        if not done or (unreachable and _lost_redis(waiting)):
            waiting.cancel()
            if unreachable:
                return await self._end_unreachable(ticket, queued)
            raise shutting_down(in_flight=True)
        meta = waiting.result()
        try:
            if isinstance(meta, JobResult):  # handed over: recorded here
                return _Answered(await self.ended(ticket, meta))
            return _Answered(await self.result_of(ticket, meta))
        except ApiError as error:
            if error.code == STATUS_CANCELLED:
                raise shutting_down(in_flight=True) from None
            raise

    async def _end_unreachable(self, ticket: Ticket, queued: Queued) -> "_Answered":
        """End a non-streamed request the drain cut while Redis could not be reached (:meth:`_end_unreached`):
        503 ``shutting_down``, or the answer of a worker's end that came first (as for a timeout).

        The reservation is released, to what the end records (retried until the gateway stops; then the
        gateway that follows settles it from this end once the worker names it: nothing charged). A
        database that refuses the entry too leaves nothing to stop the job: the client is told so
        (:func:`shutting_down`, ``unrecorded``), not that it was cancelled, and the reservation stays held,
        so that the run that follows is charged what it records (as a timeout whose stop Redis did not
        take is charged, not freed).
        """
        ended = await self._end_unreached(ticket, queued)
        if isinstance(ended, AuditEntry):
            if ended.kind not in _GAVE_UP:  # a worker's end came first: it answers
                return _Answered(await self._answered_by(ticket, ended))
            await self._settle_usage(ticket, used_tokens(ended.body.get("usage")))
        raise shutting_down(in_flight=True, unrecorded=ended is False)

    async def end_cut_stream(self, ticket: Ticket, queued: Queued) -> bool | None:
        """End a stream the drain cut before any of its text came here and now (:meth:`_end_unreached`):
        its job taken back if still queued, or, Redis unreachable, its end recorded in the database, rather
        than in :meth:`abandon`'s wait: that wait is for an outcome Redis would carry, and the stopping
        gateway cancels it a moment later, so the request was left with no end and its job ran at the next
        start (probe p1 F1). True: ended (recorded, its usage settled);
        False: neither Redis nor the database could be reached (its reservation stays held, as in
        :meth:`_end_unreachable`); None: Redis answered and a worker has the job: it records the end, and the
        stream is abandoned as usual."""
        ended = await self._end_unreached(ticket, queued)
        if isinstance(ended, AuditEntry):
            await self._settle_usage(ticket, used_tokens(ended.body.get("usage")))
            return True
        return ended

    async def _end_unreached(self, ticket: Ticket, queued: Queued) -> AuditEntry | bool | None:
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
        await self._request_cancel(ticket.request_id)
        withdrawn = await self.dispatcher.withdraw(queued)
        if withdrawn:
            await self._withdrawn_end(ticket, stopped=True)
            return True
        if withdrawn is not None:
            return None
        await _until_aged(queued)
        winner = await self.request_log.end(ticket, "cancelled", self._gone_while_queued(ticket, stopped=True))
        if winner is None:
            log.error("request %s: its job could not be cancelled (Redis unreachable) nor its end recorded (the "
                      "audit store refused it); it may run once Redis is back", ticket.request_id)
            return False
        return winner

    def _gone_while_queued(self, ticket: Ticket, *, stopped: bool = False) -> dict[str, Any]:
        """The body of a request ended before a worker took it: no output, as its ``prompt_logging`` keeps
        one (under ``hash`` a digest and a length, no payload; it was ``"output": ""`` whatever the level).
        ``stopped``: ended by its stopping gateway's drain, not by its client."""
        job = ticket.job
        error = _STOPPED_WHILE_QUEUED if stopped else _GONE_WHILE_QUEUED
        return {**logged_output("", job.prompt_logging, job.redact, self.digester), "error": dict(error)}

    async def _withdrawn_end(self, ticket: Ticket, *, stopped: bool = False) -> ApiError:
        """End a request whose job was taken back from the queue: ``cancelled``, nothing used (unless an
        end was recorded before: a run that died after recording it, its job restored to the queue, is
        charged what that end records); the error to raise (its client is gone; ``stopped``: the drain
        ended it, and its client is told 503 ``shutting_down``)."""
        winner = await self.request_log.end(ticket, "cancelled", self._gone_while_queued(ticket, stopped=stopped))
        await self._settle_usage(ticket, used_tokens(winner.body.get("usage")) if winner is not None else None)
        if stopped:
            return shutting_down(in_flight=True)
        # 499, not a 5xx: the client went away (the metrics count it with the client's errors)
        return ApiError(CLIENT_CLOSED_STATUS, "cancelled", "The request was cancelled before it completed.")

    async def _judged_outcome(self, ticket: Ticket, pending: PendingResult, hold: HoldBack, *,
                              timeout_s: float | None = None,
                              abandoned: bool = False) -> dict[str, Any] | JobResult:
        """The outcome of a checked job whose text is not relayed: its report is answered on the way.

        A non-streamed output is judged whole, as one final window (a stop
        leaves the client nothing, as nothing was released before it);
        ``abandoned``: the client has left, what it received stays what ``hold`` released.
        An output the worker handed over is recorded here: its result is
        returned; so is the end made of its fallback when the report was lost
        (:meth:`HandedOver.record_fallback`).
        """
        assert self.output_rules is not None
        async with contextlib.aclosing(pending.events(timeout_s or self.request_timeout_s)) as incoming:
            async for event in incoming:
                if isinstance(event, OutputReport):
                    if event.handed_over is None:
                        await self.output_rules.answer(ticket, hold, event, abandoned=abandoned)
                        continue
                    assert self.handed_over is not None
                    self._settle_ahead(ticket, event)
                    recorded = await self.handed_over.record(ticket, hold, event, abandoned=abandoned)
                    if recorded is not None:
                        return recorded
                elif isinstance(event, FoundFallback):
                    assert self.handed_over is not None
                    recorded = await self.handed_over.record_fallback(ticket, hold, event.entry,
                                                                      abandoned=abandoned)
                    if recorded is not None:
                        return recorded
                elif isinstance(event, dict):
                    return event
        raise ResultTimeout(f"no result for {ticket.request_id}")  # pragma: no cover - events() ends with it

    async def result_of(self, ticket: Ticket, meta: dict[str, Any]) -> JobResult:
        """Turn a job's outcome (``workers.replies``: SUCCESS or FAILURE; REVOKED stays understood) into a
        result, or a designed error.

        A failure is recorded here unless the request already ended (a
        worker that recorded its end, then raised): that end then answers,
        and is charged, as in :meth:`timed_out`.
        """
        status = meta.get("status")
        if status == "SUCCESS" and isinstance(meta.get("result"), dict):
            return await self.ended(ticket, JobResult.from_payload(meta["result"]))
        if status == "REVOKED":  # expired in the queue before a worker took it
            winner = await self.request_log.end(ticket, "timed_out", {"error": {"code": "expired",
                                                                                "message": "expired in queue"}})
            if winner is not None and winner.kind not in _GAVE_UP:
                return await self._answered_by(ticket, winner)
            await self._settle_usage(ticket, used_tokens(winner.body.get("usage")) if winner is not None else None)
            raise ApiError(504, "timed_out", "The request expired in the queue before a worker could take it.")
        message = _raised(meta.get("result"))
        winner = await self.request_log.end(ticket, "failed", {"error": {"code": "worker_error", "message": message}})
        if winner is not None:  # this failure (502 worker_error, nothing charged), or an end written before it
            return await self._answered_by(ticket, winner)
        await self._settle_usage(ticket, None)
        raise ApiError(502, "worker_error", "The model worker failed on this request; it has been logged.")

    async def _answered_by(self, ticket: Ticket, winner: AuditEntry) -> JobResult:
        """The answer the request's terminal entry gives (its completion, or the error a worker's result
        with that entry would give); usage is settled to what it records."""
        result = JobResult.from_terminal(winner.kind, winner.seq, winner.body, winner.payload)
        await self._settle_usage(ticket, result.prompt_tokens + result.completion_tokens)
        if result.status != STATUS_COMPLETED:  # a failure, or an output logged only as a digest or masked
            raise worker_error(result)
        return result

    async def ended(self, ticket: Ticket, result: JobResult) -> JobResult:
        """A generation's result (recorded by its worker, or here for a handed-over output): the
        completion, or its designed error; usage is settled either way."""
        observe_result(ticket.model, result.prompt_tokens, result.completion_tokens, result.queue_ms)
        await self._settle_usage(ticket, result.prompt_tokens + result.completion_tokens)
        if result.status == STATUS_COMPLETED:
            return result
        if result.audit_seq is None:  # its end could not be recorded: kept pending, or recorded now
            await self.request_log.end(ticket, "failed", {"error": result.error})
        raise worker_error(result)

    async def timed_out(self, ticket: Ticket, *, output: str | None = None, started: bool = False,
                        outcome: dict[str, Any] | JobResult | None = None,
                        verdict: OutputVerdict | None = None) -> JobResult:
        """The wait ran out and the job was asked to stop (:meth:`stop_for_timeout`): end the request, 504.

        ``started``: a worker may have begun the job; ``outcome``: what it
        reported within the grace that followed (:data:`STOP_GRACE_S`). A
        worker that stopped records the end itself, ``timed_out`` with what it
        generated: that entry is the request's end, it is charged and counted
        what it records, and the client gets the 504. An outcome that is a
        completion (it finished just then) or a failure answers as it would
        have before the timeout.

        With no outcome the gateway records ``timed_out`` itself. ``output`` is
        what a stream already sent to its client; ``verdict``: the one a
        checked stream's worker was told (:meth:`tell_timed_out`), whose
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
            return await self._stopped(ticket, outcome)
        job = ticket.job
        body: dict[str, Any] = {"error": {"code": "timed_out",
                                          "message": f"no result within {self.request_timeout_s:g}s"}}
        if output is not None:  # kept as the request's prompt_logging allows, like a worker's output
            body.update(logged_output(output, job.prompt_logging, job.redact, self.digester))
        if verdict is not None:  # released text only, masked already: no finding of the rules' in clear
            body.update({"output_decision": decision_record(verdict, self.digester),
                         **logged_client_output(verdict.client_text, job.prompt_logging,
                                                [*job.redact, *verdict.redact], self.digester)})
        reserved = _reserved_usage(ticket) if started else None
        if reserved is not None:
            body["usage"] = reserved
            body["error"]["message"] += (f"; its worker did not report what it generated within "
                                         f"{self.stop_grace_s:g}s, so it is charged what it reserved")
        winner = await self.request_log.end(ticket, "timed_out", body)
        if winner is not None and winner.kind not in _GAVE_UP:
            return await self._answered_by(ticket, winner)
        # This timeout's own entry (nothing used if no worker began the job, else the reservation), one
        # written earlier (a worker's time limit or stop, a cancel, with what it generated), or none
        # (refused by the database, kept pending: charged as that entry says).
        usage = winner.body.get("usage") if winner is not None else reserved
        await self._settle_usage(ticket, used_tokens(usage) if usage is not None else None)
        raise self._timeout_error()

    async def _stopped(self, ticket: Ticket, outcome: dict[str, Any] | JobResult) -> JobResult:
        """The outcome a worker reported in the grace after the timeout: its end (recorded by it, or here
        for a handed-over output) is the request's, charged and counted what it records."""
        if isinstance(outcome, JobResult):  # handed over: recorded here
            return await self.ended(ticket, outcome)
        if outcome.get("status") == "SUCCESS" and isinstance(outcome.get("result"), dict):
            result = JobResult.from_payload(outcome["result"])
            if result.status in _GAVE_UP and result.audit_seq is not None:  # stopped, its end recorded
                observe_result(ticket.model, result.prompt_tokens, result.completion_tokens, result.queue_ms)
                await self._settle_usage(ticket, result.prompt_tokens + result.completion_tokens)
                raise self._timeout_error()
        return await self.result_of(ticket, outcome)

    def _timeout_error(self) -> ApiError:
        return ApiError(504, "timed_out", f"The model did not answer within {self.request_timeout_s:g} seconds.")

    async def queue_down(self, ticket: Ticket, exc: BaseException) -> ApiError:
        """Redis failed under the request: settle, record it failed, and give the 503 to raise."""
        log.error("queue unavailable for %s: %s", ticket.request_id, exc)
        await self._settle_usage(ticket, None)
        await self.request_log.end(ticket, "failed", {"error": {"code": "queue_unavailable", "message": str(exc)}})
        return ApiError(503, "queue_unavailable", QUEUE_UNAVAILABLE_MESSAGE)

    async def no_place(self, ticket: Ticket, exc: NoPlace) -> ApiError:
        """The queue filled between the early reservation and the push of a request that held no place
        (gateway/requests/admission.py): its reservation is undone, as if never made, like a request refused
        ``queue_full`` at its admission; its entry ends ``failed`` with the 429 to raise."""
        refusal = exc.refusal
        error = QueueFull(refusal.waiting, refusal.limit, ticket.model, ticket.principal.team, refusal.team)
        if ticket.reservation is not None:
            await undo_reservation(self.counters, ticket.reservation)
        queue = {k: v for k, v in error.record().items() if k not in ("admitted", "code")}
        await self.request_log.end(ticket, "failed", {"error": {"code": QUEUE_FULL, "message": error.message()},
                                                      "queue": queue})
        return error.error()

    def abandon(self, ticket: Ticket, hold: HoldBack | None = None, pending: PendingResult | None = None,
                subscription: contextlib.AsyncExitStack | None = None, queued: Queued | None = None, *,
                cut: bool = False) -> None:
        """The client left mid-stream (or the drain ended it): cancel the generation and see the request ended.

        ``hold``: the stream's hold-back (what the client received), under output rules.
        ``pending`` and ``subscription``: the stream's own wait, handed over still open (closed here
        once the request ended): a report that reached it unread, or that arrives before a new wait
        could be entered, would be lost, and its worker would wait out its verdict timeout.
        ``queued``: where its job waits, taken back if no worker has taken it yet.
        ``cut``: the stopping gateway's drain ended it (:meth:`StreamEvents.cut`), and :meth:`tell_cancelled`
        ran already.
        """
        task = asyncio.get_running_loop().create_task(self._cancel_and_close(ticket, hold, pending, subscription,
                                                                             queued, cut=cut))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def tell_timed_out(self, ticket: Ticket, hold: HoldBack | None, delivered: str) -> OutputVerdict | None:
        """Tell a checked stream's worker, before the stop (:meth:`stop_for_timeout`), that the request timed
        out and what its client received (``delivered``): the ``cancelled`` verdict marked ``timed_out``
        (:meth:`OutputRules.cancelled`). The worker, stopping at the key (or waiting for a verdict on an
        output it finished), records ``timed_out`` with that ``client_output`` and the decision, as a
        cancelled stream's entry has them (p2 #3: it had neither). Returns the verdict; None when there is
        nothing to tell: an unchecked stream, or one the output rules stopped already, whose worker reports
        and waits for its verdict as usual (the stop's reason stands: :meth:`stop_for_timeout`).
        """
        if hold is None or self.output_rules is None or hold.stopped:
            return None
        return await self.output_rules.cancelled(ticket, hold, client_text=delivered, timed_out=True)

    async def tell_cancelled(self, ticket: Ticket, hold: HoldBack | None, delivered: str | None = None) -> None:
        """Tell a stream's worker that its request is cancelled, and (under output rules) what its client
        received: the ``cancelled`` verdict first (:meth:`OutputRules.cancelled`), then the cancel key.

        The worker, stopping at the key, records ``cancelled`` with that verdict's ``client_output`` and
        decision (``workers/generation.py``); one that finished and waits for its verdict gets it at once
        (its report may be unread, or being judged: that judgement is abandoned with the client). Without
        the verdict a cut stream's entry could not say what its client received (h9 F3). ``delivered``: what
        the stream sent its client (the drain's cut), when ``hold`` may have released more (q1 F2).
        """
        if hold is not None and self.output_rules is not None:
            await self.output_rules.cancelled(ticket, hold, client_text=delivered)
        await self._request_cancel(ticket.request_id)

    async def _cancel_and_close(self, ticket: Ticket, hold: HoldBack | None = None,
                                pending: PendingResult | None = None,
                                subscription: contextlib.AsyncExitStack | None = None,
                                queued: Queued | None = None, *, cut: bool = False) -> None:
        """Ask the worker to stop (:meth:`tell_cancelled`); if no worker ever ends the request, end it here.

        A job still in the queue is taken back from it at once and the request
        ended ``cancelled`` here: its place and its reservation are free now, not
        when a worker would have reached it. A worker that picks the job up (or
        is running it) sees the cancel key,
        stops, and records ``cancelled`` with the partial output (and what the
        client received, from the verdict). If the job
        never reaches a worker before it expires, nobody else would record an
        end, so after the queue's expiry the gateway records ``cancelled``.
        """
        request_id = ticket.request_id
        if not cut:
            await self.tell_cancelled(ticket, hold)
        try:  # the worker publishes (and stores) the outcome once the request has ended; it may have already
            async with contextlib.AsyncExitStack() as stack:
                if subscription is not None:
                    stack.push_async_exit(subscription)
                if queued is not None and await self.dispatcher.withdraw(queued):
                    await self._withdrawn_end(ticket, stopped=cut)
                    return
                checked = self.output_rules is not None and hold is not None
                if pending is None:
                    pending = await stack.enter_async_context(self.waiter.expect(request_id, checked=checked))
                if not checked:
                    await pending.get(self.request_timeout_s + 5, look_stored=True)
                else:  # a worker that finished before it saw the cancel reports its output: answer it
                    assert hold is not None
                    await pending.look_stored()
                    await self._judged_outcome(ticket, pending, hold, timeout_s=self.request_timeout_s + 5,
                                               abandoned=True)
        except (ResultTimeout, RedisError, OSError):
            pass
        entry = await self.request_log.terminal_for(request_id)
        if entry is None:  # no worker took it (or Redis cannot say): end it here, where a later worker looks
            if queued is not None:
                await _until_aged(queued)
            await self.request_log.end(ticket, "cancelled", self._gone_while_queued(ticket, stopped=cut))
            await self._settle_usage(ticket, None)
            return
        await self._settle_usage(ticket, used_tokens(entry.body.get("usage")))

    async def _settle_usage(self, ticket: Ticket, tokens: int | None) -> None:
        """Settle ``ticket``'s reservation to ``tokens`` (None: release it), unless a settlement was begun
        ahead (:meth:`_settle_ahead`): then wait for that one, as Redis would ignore this one."""
        ahead = self._settling.pop(ticket.request_id, None)
        if ahead is not None:
            await asyncio.shield(ahead)  # a cancelled request still leaves its usage settled
            return
        await settle_reservation(self.counters, ticket.reservation, tokens)

    def _settle_ahead(self, ticket: Ticket, report: OutputReport) -> None:
        """Begin settling a handed-over output's tokens now, while its output is judged and recorded.

        Settling waited for the end's record, one Redis round trip after it on
        every such request's path; the tokens are known from the report. Every
        way that request ends charges what the report says (``HandedOver.record``
        returns its counts, also when the database refuses the entry), and a
        second settlement changes nothing in Redis, so the one begun here is
        the request's settlement: :meth:`_settle_usage` waits for it instead.
        """
        tokens = handed_over_tokens(report)
        if tokens is None or ticket.reservation is None or ticket.request_id in self._settling:
            return  # unreadable: the request's end settles as before
        task = asyncio.get_running_loop().create_task(
            settle_reservation(self.counters, ticket.reservation, tokens))
        self._settling[ticket.request_id] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget_settlement(self, ticket: Ticket) -> None:
        """Drop a settlement begun ahead that no end waited for (it still runs to its end)."""
        self._settling.pop(ticket.request_id, None)

    async def _request_cancel(self, request_id: str, value: bytes = b"1") -> None:
        try:
            await self.redis.set(cancel_key(request_id), value, ex=CANCEL_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("cannot flag %s as cancelled: %s", request_id, exc)

    async def stop_output(self, request_id: str) -> None:
        """The output rules stopped the output: the worker stops, reports it and records the verdict."""
        await self._request_cancel(request_id, STOP_CONTENT_FILTER)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.handed_over is not None:  # the fallbacks of the outputs recorded last
            await self.handed_over.aclose()


class StreamEvents:
    """A queued streaming request's events: its text pieces, then its :class:`JobResult`.

    Iterate it once. Closing it before the result (the client went away)
    cancels the generation and sees the request still gets its terminal
    entry; :meth:`aclose` runs when the iteration ends and may run again.
    """

    def __init__(self, runner: TicketRunner, ticket: Ticket, pending: PendingResult,
                 subscription: contextlib.AsyncExitStack, *, checked: bool = True,
                 queued: Queued | None = None) -> None:
        self._runner = runner
        self._ticket = ticket
        self._queued = queued
        self._pending = pending
        self._subscription = subscription
        self._finished = False
        self._closed = False
        #: The drain ended it, and its worker was told so (:meth:`TicketRunner.tell_cancelled`).
        self._cut = False
        #: A piece of its text came (a worker runs its job), released to the client or held back.
        self._heard = False
        #: The job's outcome (``workers.replies``), once it came.
        self._outcome: dict[str, Any] | None = None
        #: Under output rules (``checked``: the revision has one): what was received, judged and released.
        self._hold = runner.output_rules.hold() if runner.output_rules is not None and checked else None
        #: The verdict its worker was sent when the request timed out (:meth:`TicketRunner.tell_timed_out`):
        #: from then on the stream releases nothing more and answers no report (that verdict is the answer).
        self._timed_out: OutputVerdict | None = None
        #: The drain's cut was asked (:meth:`cut`): no verdict of a judgement still running is sent (q1 F2).
        self._cut_asked = False
        #: The judgement of its worker's report under way (:meth:`_answer`), cancelled by the cut.
        self._judging: asyncio.Future[OutputVerdict] | None = None
        #: Its worker was sent the verdict on its report: it records what that says, and the cut lets the
        #: result come (for :data:`CUT_GRACE_S`) rather than tell the client otherwise.
        self._answered = False

    def __aiter__(self) -> AsyncIterator[str | JobResult]:
        return self._events()

    async def _events(self) -> AsyncIterator[str | JobResult]:
        """The stream's text, then its result. At the request timeout the job is asked to stop; a job a
        worker began is relayed on for the grace (:data:`STOP_GRACE_S`) until the worker's end comes, so
        the client gets what the worker generated and the request is charged it (:meth:`TicketRunner.timed_out`)."""
        runner, ticket = self._runner, self._ticket
        delivered: list[str] = []
        try:
            try:
                async for piece in self._relay(runner.request_timeout_s, delivered):
                    yield piece
                if self._outcome is None:  # pragma: no cover - events() always ends with the result or raises
                    return
                self._finished = True
                result = await runner.result_of(ticket, self._outcome)
            except ResultTimeout:  # before OSError: TimeoutError is one
                # under output rules, what the client received goes to the worker before the stop; from then
                # on nothing more is released (the entry says what the client got)
                self._timed_out = await runner.tell_timed_out(ticket, self._hold, "".join(delivered))
                started = await runner.stop_for_timeout(ticket)
                if not started:
                    await runner.withdraw_unstarted(self._queued)
                if started:  # no end within the grace (or Redis failed meanwhile): recorded here
                    with contextlib.suppress(RedisError, OSError):
                        async for piece in self._relay(runner.stop_grace_s, delivered):
                            yield piece
                self._finished = True  # the audit keeps what the client received, or what the worker generated
                result = await runner.timed_out(ticket, output="".join(delivered), started=started,
                                                outcome=self._outcome, verdict=self._timed_out)
            except (RedisError, OSError) as exc:
                self._finished = True
                raise await runner.queue_down(ticket, exc) from None
            missing = _unsent_text("".join(delivered), result)
            if missing:
                yield missing
            yield result
        finally:
            await self.aclose()

    async def _relay(self, timeout_s: float, delivered: list[str]) -> AsyncIterator[str]:
        """Yield the text the client may have as it comes (kept in ``delivered``), answering the worker's
        report on the way; the outcome, once it came, is ``self._outcome``. Raises :class:`ResultTimeout`
        when none came within ``timeout_s``."""
        runner, ticket = self._runner, self._ticket
        async with contextlib.aclosing(self._pending.events(timeout_s)) as incoming:
            async for event in incoming:
                if isinstance(event, str):
                    self._heard = True
                    released = await self._released(event)
                    if released:
                        delivered.append(released)
                        yield released
                elif event is _CUT:  # the stopping gateway's drain time is over: its job is cancelled
                    # now, not after the loop has stopped; the worker is told what the client received
                    await runner.tell_cancelled(ticket, self._hold, "".join(delivered))
                    self._cut = True
                    # no text came: its job may still wait in the queue, taken back (or, Redis gone, ended) here
                    ended = None if self._heard or self._queued is None else \
                        await runner.end_cut_stream(ticket, self._queued)
                    if ended is not None:
                        self._finished = True  # ended here: nothing left for aclose to abandon
                        raise shutting_down(in_flight=True, unrecorded=not ended)
                    raise shutting_down(in_flight=True)
                elif isinstance(event, OutputReport):
                    if self._hold is not None and runner.output_rules is not None and self._timed_out is None:
                        await self._answer(event)  # unsent if the cut came first: its mark is read next
                elif isinstance(event, dict):
                    self._outcome = event
                    return

    async def _answer(self, report: OutputReport) -> None:
        """Judge the worker's report and send it the verdict, unless the drain's cut comes first.

        The cut used to queue its mark behind the report being judged: that judgement finished, its "allow,
        whole" went to the worker, which recorded ``completion`` with the whole output as ``client_output``,
        while the client got the ``shutting_down`` event instead of that text (probe q1 F2). Now :meth:`cut`
        cancels the judgement, and a verdict that comes anyway is dropped: the cut's mark, read next, tells
        the worker ``cancelled`` with what the client received. The judgement runs in a task of its own
        (one per checked stream, at its end) so that the cut can end it without ending the stream's task.
        """
        rules, hold = self._runner.output_rules, self._hold
        assert rules is not None and hold is not None
        judging = asyncio.ensure_future(rules.verdict_on(self._ticket, hold, report))
        self._judging = judging
        try:
            await asyncio.wait({judging})
        finally:
            self._judging = None
            judging.cancel()  # the stream's own task was cancelled (its client left): the judgement goes too
        if self._cut_asked:
            if not judging.cancelled():
                judging.exception()  # retrieved: a verdict or failure nobody uses is not logged as lost
            return
        verdict = judging.result()
        await rules.send(self._ticket.request_id, verdict)
        self._answered = True

    async def _released(self, piece: str) -> str:
        """What a received piece lets the client have: itself, or (under output rules) the text judged safe.

        The window is judged here, in the stream's own task (one evaluation
        at a time per stream): pieces arriving meanwhile wait in the queue,
        and nothing could be released before the judgement anyway. When more
        pieces already wait, they are read first, so one window covers them.
        """
        hold = self._hold
        if hold is None or self._runner.output_rules is None:
            return piece
        if hold.stopped or self._timed_out is not None:
            return ""
        hold.add(piece)
        if not hold.due() or self._pending.backlog():
            return ""
        released, _ = await self._runner.output_rules.judge(self._ticket, hold)
        if hold.stopped:  # the worker stops, reports, and records per the verdict; the result ends the stream
            await self._runner.stop_output(self._ticket.request_id)
        return released

    def cut(self) -> None:
        """End the stream at its next event with an error event (503 ``shutting_down``): its gateway is
        stopping and its drain time is over (``gateway/drain.py``). Its job is cancelled as when the client
        leaves (:meth:`aclose`), its worker told what the client received; a judgement of its worker's report
        still running is abandoned, its verdict unsent (:meth:`_answer`). A stream whose worker has its verdict
        already waits up to :data:`CUT_GRACE_S` for its result, as a non-streamed request does
        (:meth:`TicketRunner._cut_while_running`): its worker records the end that verdict says."""
        if self._closed or self._finished:
            return
        if self._answered:  # the worker records what its verdict says: its result is served if it comes soon
            asyncio.get_running_loop().call_later(CUT_GRACE_S, self._pending.interrupt, _CUT)
            return
        self._cut_asked = True
        if self._judging is not None:
            self._judging.cancel()
        self._pending.interrupt(_CUT)

    async def aclose(self) -> None:
        """Stop listening; if the request has not ended, cancel it (see the class docstring)."""
        if self._closed:
            return
        self._closed = True
        if not self._finished:  # the wait stays open: what the worker sends from now on is still heard
            self._runner.abandon(self._ticket, self._hold, self._pending, self._subscription, self._queued,
                                 cut=self._cut)
            return
        await self._subscription.aclose()


#: The event :meth:`StreamEvents.cut` puts in a stream's way.
_CUT = object()


def _lost_redis(waiting: asyncio.Future[Any]) -> bool:
    """Whether a finished wait for an outcome failed because Redis went away (not its request timeout)."""
    if waiting.cancelled():
        return False
    exc = waiting.exception()
    return isinstance(exc, (RedisError, OSError)) and not isinstance(exc, ResultTimeout)


async def _until_aged(queued: Queued) -> None:
    """Wait until ``queued``'s job has waited :data:`UNSEEN_END_AGE_S` since it was queued (at once, mostly)."""
    if not queued.enqueued_at_ns:
        return
    left_s = UNSEEN_END_AGE_S - (time.time_ns() - queued.enqueued_at_ns) / 1e9
    if left_s > 0:
        await asyncio.sleep(left_s)


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


def _unsent_text(delivered: str, result: JobResult) -> str:
    """The part of the audited output a stream has not delivered yet.

    Pieces travel on pub/sub and can be lost (a Redis reconnect) or still be
    unread when the result is found in its stored copy; the result holds the
    whole audited text, so the stream sends what is missing before it ends.
    If what was sent is not the start of that text, the stream cannot be made
    right and ends with an error event instead of a false success.
    """
    if result.text.startswith(delivered):
        return result.text[len(delivered):]
    log.error("streamed text of a request differs from its result (%d vs %d chars)", len(delivered),
              len(result.text))
    raise ApiError(502, "stream_inconsistent", "The streamed text does not match the recorded output; "
                   "discard what was received. The request has been logged.")


def _raised(result: Any) -> str:
    """What a task that raised reported (``workers.replies.failure``), as the failure entry's message.

    The exception's type leads: "command not allowed when used memory >
    'maxmemory'" alone does not say that Redis refused it (OutOfMemoryError).
    """
    if not isinstance(result, dict):
        return ""
    kind, message = result.get("exc_type"), str(result.get("exc_message") or "")
    return f"{kind}: {message}" if isinstance(kind, str) and kind else message
