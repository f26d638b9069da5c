"""Everything after admission: queue the job, wait or stream, cancel, time out, settle, record the end.

:class:`TicketRunner` queues a request's job and waits for its answer; its other paths live in modules of their
own, which it calls: a stream's relay (``gateway/requests/stream_events.py``), the ends of requests cancelled by
their client or cut by the drain (``gateway/requests/cancelled_ends.py``), the timeout's stop, grace and end
(``gateway/requests/timeouts.py``), and the settling of usage (:class:`~gateway.requests.usage.Settlements`).

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
from dataclasses import replace
from typing import Any, Awaitable, Callable, Coroutine

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditEntry
from gateway.dispatch import Dispatcher, QueueUnavailable, ResultTimeout, ResultWaiter
from gateway.dispatch.queue import NoPlace, Queued
from gateway.dispatch.lost_jobs import is_lost
from gateway.dispatch.results import FoundFallback, PendingResult
from gateway.api_errors import ApiError
from gateway.drain import Cut, Drain
from gateway.limits import UsageCounters
from gateway.limits.charge import used_tokens
from gateway.observability.metrics import observe_result
from gateway.requests.call_off import CLIENT_GONE, STOPPING, CallOff
from gateway.requests.cancelled_ends import GAVE_UP, Answered, cut_while_running, gone_while_queued, until_aged, \
    withdrawn_end
from gateway.requests.delivered import DeliveredLater
from gateway.requests.fallback_drops import FallbackDrops
from gateway.requests.handed_over import HandedOver, handed_over_tokens
from gateway.requests.holdback import HoldBack
from gateway.requests.output_rules import OutputRules
from gateway.requests.refusals import (QUEUE_FULL, QUEUE_LOST, QUEUE_UNAVAILABLE_MESSAGE, QueueFull, queue_lost,
                                       worker_error)
from gateway.requests.request_log import RequestLog
from gateway.requests.stream_events import StreamEvents
from gateway.requests.ticket import Ticket
from gateway.requests.timeouts import STOP_GRACE_S, after_timeout
from gateway.requests.usage import Settlements, undo_reservation
from workers.contract.jobs import CANCEL_TTL_S, STATUS_COMPLETED, JobResult, cancel_key
from workers.contract.output_check import STOP_CONTENT_FILTER, OutputReport
from workers.contract.privacy import Digester

log = logging.getLogger(__name__)


#: Returns once the client has gone away (its connection closed); see :meth:`TicketRunner.complete`.
ClientGone = Callable[[], Awaitable[Any]]


class TicketRunner:
    """Runs admitted tickets to their end: a result, or a designed :class:`ApiError`."""

    def __init__(self, *, dispatcher: Dispatcher, waiter: ResultWaiter, redis: aioredis.Redis,
                 counters: UsageCounters, request_log: RequestLog, digester: Digester,
                 request_timeout_s: float, output_rules: OutputRules | None = None,
                 stop_grace_s: float = STOP_GRACE_S, end_retry_interval_s: float = 5.0,
                 end_retry_horizon_s: float = 86400.0) -> None:
        self.dispatcher = dispatcher
        self.waiter = waiter
        self.redis = redis
        self.counters = counters
        self.request_log = request_log
        self.digester = digester
        self.request_timeout_s = request_timeout_s
        #: How long a timed-out job that a worker began is given to stop and report
        #: (``GOVGATE_TIMEOUT_GRACE_S``; default :data:`~gateway.requests.timeouts.STOP_GRACE_S`).
        self.stop_grace_s = stop_grace_s
        #: The output rules (None: outputs are not checked; jobs say so to their workers).
        self.output_rules = output_rules
        #: Records the outputs workers hand over (non-streamed, under the output rules).
        self.handed_over = HandedOver(rules=output_rules, request_log=request_log, drops=FallbackDrops(redis),
                                      digester=digester) if output_rules is not None else None
        #: The ``delivered`` entries of checked streams whose end is not in the log yet (or whose database
        #: refused), tried again as kept ends are (``GOVGATE_TERMINAL_RETRY_INTERVAL_S`` / ``_HORIZON_S``).
        self.delivered_later = DeliveredLater(interval_s=end_retry_interval_s, horizon_s=end_retry_horizon_s)
        self._background: set[asyncio.Task] = set()
        #: Settles each request's reservation at its end, or ahead of it for a handed-over output.
        self.settlements = Settlements(counters, self._background)

    async def complete(self, ticket: Ticket, gone: ClientGone | None = None,
                       cut: ClientGone | None = None, stopping: Drain | None = None) -> JobResult:
        """Queue the job and wait for its result (judging its output on the way, under output rules).

        ``gone`` returns when the client has gone away: then the worker is asked
        to stop (the cancel key), and a job no worker has taken yet is taken back
        from the queue at once, so that its place and its reservation are free
        now rather than when a worker would have reached it; the request ends
        ``cancelled``, recorded here (:func:`~gateway.requests.cancelled_ends.withdrawn_end`).
        ``cut`` returns when the stopping gateway's drain time is over (``gateway/drain.py``), or the
        request's key was revoked (``gateway/auth/revocations.py``), with the :class:`CallOff` that says which
        (None: the drain's): the job is cancelled the same way, and the client is answered that reason's
        error, 503 ``shutting_down`` or 401 ``invalid_api_key`` (:meth:`_unless_gone`).
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
                    pending.queued(queued.key, queued.message)
                    hold = self.output_rules.hold() if self.output_rules is not None and checked else None
                    try:
                        outcome = self.wait_for_outcome(ticket, pending, hold, self.request_timeout_s)
                        meta = await self._unless_gone(ticket, queued, outcome, gone, cut,
                                                       stopping.wait_hurried if stopping is not None else None)
                    except ResultTimeout:  # before OSError: TimeoutError is one. Still subscribed: the
                        # worker's report of what it generated is heard
                        return await after_timeout(self, ticket, pending, hold, queued)
            except NoPlace as exc:
                raise await self.no_place(ticket, exc) from None
            except (QueueUnavailable, RedisError, OSError) as exc:
                raise await self.queue_down(ticket, exc) from None
            if isinstance(meta, Answered):  # ended by the drain, answered already
                return meta.result
            if isinstance(meta, JobResult):  # handed over: recorded here
                return await self.ended(ticket, meta)
            return await self.result_of(ticket, meta)
        finally:
            self.settlements.forget(ticket)

    def wait_for_outcome(self, ticket: Ticket, pending: PendingResult, hold: HoldBack | None,
                         timeout_s: float) -> Awaitable[dict[str, Any] | JobResult]:
        """The wait for a non-streamed job's outcome (``hold``: under output rules, judged on the way)."""
        if hold is None:
            return pending.get(timeout_s)
        return self._judged_outcome(ticket, pending, hold, timeout_s=timeout_s)

    async def withdraw_unstarted(self, queued: Queued | None) -> None:
        """Take back from its queue a job its request timed out before any worker began: its place (and
        its team's waiting count) was held until a worker reached the dead job, a frozen worker's never,
        and other requests were refused ``queue_full`` meanwhile (probe p2). A worker that takes it anyway
        sees the stop at its start; a Redis that cannot answer leaves it to that."""
        if queued is not None:
            await self.dispatcher.withdraw(queued)

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
            raise await withdrawn_end(self, ticket, STOPPING) from None

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
                pending.queued(queued.key, queued.message)
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
                           gone: ClientGone | None, cut: ClientGone | None = None,
                           hurried: ClientGone | None = None) -> Any:
        """``outcome``'s value, unless the client goes away first, or the drain ends the request
        (see :meth:`complete`).

        A job taken back from the queue ends here (:class:`ApiError` ``cancelled``,
        which nobody reads; ``shutting_down`` after a cut); one a worker already has is still
        waited for: the worker stops at the cancel key and records the end, settled as usual.
        After a cut that wait is short (:data:`~gateway.requests.cancelled_ends.CUT_GRACE_S`: the gateway is
        stopping), and its answer is the 503 unless the generation ended first.
        """
        if gone is None and cut is None:
            return await outcome
        waiting = asyncio.ensure_future(outcome)
        watching = [asyncio.ensure_future(watch()) for watch in (gone, cut) if watch is not None]
        # the controller's ``cut`` returns a future of the request's own, which ensure_future keeps: no task
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
            why = _called_off(cutting)
            await self.request_cancel(ticket.request_id, why.cancel_value)
            withdrawn = await self.dispatcher.withdraw(queued)
            if not withdrawn:
                if why is CLIENT_GONE:
                    return await waiting
                return await cut_while_running(self, ticket, waiting, queued, unreachable=withdrawn is None,
                                               hurried=hurried, why=why)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
            raise await withdrawn_end(self, ticket, why)
        finally:
            for task in (waiting, *watching):
                task.cancel()

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
                    self.settlements.settle_ahead(ticket, handed_over_tokens(event))
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
        and is charged, as in :func:`~gateway.requests.timeouts.timed_out`.
        """
        status = meta.get("status")
        if status == "SUCCESS" and isinstance(meta.get("result"), dict):
            return await self.ended(ticket, JobResult.from_payload(meta["result"]))
        if status == "REVOKED":  # expired in the queue before a worker took it
            winner = await self.request_log.end(ticket, "timed_out", {"error": {"code": "expired",
                                                                                "message": "expired in queue"}})
            if winner is not None and winner.kind not in GAVE_UP:
                return await self.answered_by(ticket, winner)
            await self.settlements.settle(ticket,
                                          used_tokens(winner.body.get("usage")) if winner is not None else None)
            raise ApiError(504, "timed_out", "The request expired in the queue before a worker could take it.")
        message = _raised(meta.get("result"))
        # a job Redis lost (gateway/dispatch/lost_jobs.py): 503 queue_lost, worth a retry; else a worker's failure
        code = QUEUE_LOST if is_lost(meta) else "worker_error"
        winner = await self.request_log.end(ticket, "failed", {"error": {"code": code, "message": message}})
        if winner is not None:  # this failure (502 worker_error, nothing charged), or an end written before it
            return await self.answered_by(ticket, winner)
        await self.settlements.settle(ticket, None)
        if code == QUEUE_LOST:
            raise queue_lost()
        raise ApiError(502, "worker_error", "The model worker failed on this request; it has been logged.")

    async def answered_by(self, ticket: Ticket, winner: AuditEntry) -> JobResult:
        """The answer the request's terminal entry gives (its completion, or the error a worker's result
        with that entry would give); usage is settled to what it records."""
        result = JobResult.from_terminal(winner.kind, winner.seq, winner.body, winner.payload)
        await self.settlements.settle(ticket, result.prompt_tokens + result.completion_tokens)
        if result.status != STATUS_COMPLETED:  # a failure, or an output logged only as a digest or masked
            raise worker_error(result)
        return result

    async def ended(self, ticket: Ticket, result: JobResult) -> JobResult:
        """A generation's result (recorded by its worker, or here for a handed-over output): the
        completion, or its designed error; usage is settled either way."""
        observe_result(ticket.model, result.prompt_tokens, result.completion_tokens, result.queue_ms)
        await self.settlements.settle(ticket, result.prompt_tokens + result.completion_tokens)
        if result.status == STATUS_COMPLETED:
            return result
        if result.audit_seq is None:  # its end could not be recorded: kept pending, or recorded now
            await self.request_log.end(ticket, "failed", {"error": result.error})
        raise worker_error(result)

    async def queue_down(self, ticket: Ticket, exc: BaseException) -> ApiError:
        """Redis failed under the request: settle, record it failed, and give the 503 to raise."""
        log.error("queue unavailable for %s: %s", ticket.request_id, exc)
        await self.settlements.settle(ticket, None)
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
                cut: CallOff | None = None) -> None:
        """The client left mid-stream (or the drain, or its key's revocation, ended it): cancel the generation
        and see the request ended.

        ``hold``: the stream's hold-back (what the client received), under output rules.
        ``pending`` and ``subscription``: the stream's own wait, handed over still open (closed here
        once the request ended): a report that reached it unread, or that arrives before a new wait
        could be entered, would be lost, and its worker would wait out its verdict timeout.
        ``queued``: where its job waits, taken back if no worker has taken it yet.
        ``cut``: what ended it, the stopping gateway's drain or its key's revocation (:meth:`StreamEvents.cut`),
        and :meth:`tell_cancelled` ran already.
        """
        self.in_background(self._cancel_and_close(ticket, hold, pending, subscription, queued, cut=cut))

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a request's end, its client gone) in a task the runner keeps until it is done (and
        cancels at its own close)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def tell_cancelled(self, ticket: Ticket, hold: HoldBack | None, delivered: str | None = None,
                             why: CallOff = CLIENT_GONE) -> None:
        """Tell a stream's worker that its request is cancelled, and (under output rules) what its client
        received: the ``cancelled`` verdict first (:meth:`OutputRules.cancelled`), then the cancel key.

        The worker, stopping at the key, records ``cancelled`` with that verdict's ``client_output`` and
        decision (``workers/generation.py``); one that finished and waits for its verdict gets it at once
        (its report may be unread, or being judged: that judgement is abandoned with the client). Without
        the verdict a cut stream's entry could not say what its client received (h9 F3). ``delivered``: what
        the stream sent its client (the drain's cut), when ``hold`` may have released more (q1 F2). ``why``:
        what ended it, which the cancel key (and the verdict, for a revoked key) tells the worker.
        """
        if hold is not None and self.output_rules is not None:
            await self.output_rules.cancelled(ticket, hold, client_text=delivered, key_revoked=why.key_revoked)
        await self.request_cancel(ticket.request_id, why.cancel_value)

    async def _cancel_and_close(self, ticket: Ticket, hold: HoldBack | None = None,
                                pending: PendingResult | None = None,
                                subscription: contextlib.AsyncExitStack | None = None,
                                queued: Queued | None = None, *, cut: CallOff | None = None) -> None:
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
        if cut is None:
            await self.tell_cancelled(ticket, hold)
        try:  # the worker publishes (and stores) the outcome once the request has ended; it may have already
            async with contextlib.AsyncExitStack() as stack:
                if subscription is not None:
                    stack.push_async_exit(subscription)
                if queued is not None and await self.dispatcher.withdraw(queued):
                    await withdrawn_end(self, ticket, cut or CLIENT_GONE)
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
                await until_aged(queued)
            await self.request_log.end(ticket, "cancelled", gone_while_queued(ticket, self.digester,
                                                                                   cut or CLIENT_GONE))
            await self.settlements.settle(ticket, None)
            return
        await self.settlements.settle(ticket, used_tokens(entry.body.get("usage")))

    async def request_cancel(self, request_id: str, value: bytes = b"1") -> None:
        try:
            await self.redis.set(cancel_key(request_id), value, ex=CANCEL_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("cannot flag %s as cancelled: %s", request_id, exc)

    async def stop_output(self, request_id: str) -> None:
        """The output rules stopped the output: the worker stops, reports it and records the verdict."""
        await self.request_cancel(request_id, STOP_CONTENT_FILTER)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.handed_over is not None:  # the fallbacks of the outputs recorded last
            await self.handed_over.aclose()
        await self.delivered_later.aclose()


def _called_off(cutting: asyncio.Future[Any] | None) -> CallOff:
    """What ended a request early, from its ``cut`` watch (:meth:`TicketRunner._unless_gone`): the reason it
    returned (a key's revocation), the drain's cut when it returned none, else its client going away."""
    if cutting is None or not cutting.done() or cutting.cancelled() or cutting.exception() is not None:
        return CLIENT_GONE
    why = cutting.result()
    return why if isinstance(why, CallOff) else STOPPING


def _raised(result: Any) -> str:
    """What a task that raised reported (``workers.replies.failure``), as the failure entry's message.

    The exception's type leads: "command not allowed when used memory >
    'maxmemory'" alone does not say that Redis refused it (OutOfMemoryError).
    """
    if not isinstance(result, dict):
        return ""
    kind, message = result.get("exc_type"), str(result.get("exc_message") or "")
    return f"{kind}: {message}" if isinstance(kind, str) and kind else message
