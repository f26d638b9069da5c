"""A streamed request's events: its text as it comes (held back and judged under output rules), then its result.

Split from ``gateway/requests/outcome.py``, whose :class:`~gateway.requests.outcome.TicketRunner` queues the
job and makes these events (:meth:`~gateway.requests.outcome.TicketRunner.open_stream`); this module is the
relay itself: the worker's report answered on the way (:meth:`StreamEvents._answer`), the timeout's stop and
grace (``gateway/requests/timeouts.py``), the drain's cut or the key's revocation (:meth:`StreamEvents.cut`), and
the client leaving (:meth:`StreamEvents.aclose`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from redis.exceptions import RedisError

from gateway.api_errors import ApiError
from gateway.dispatch import ResultTimeout
from gateway.dispatch.queue import Queued
from gateway.dispatch.results import PendingResult
from gateway.requests.call_off import STOPPING, CallOff
from gateway.requests.cancelled_ends import CUT_GRACE_S, end_cut_stream
from gateway.requests.delivered import record_delivered
from gateway.requests.ticket import Ticket
from gateway.requests.timeouts import stop_for_timeout, tell_timed_out, timed_out
from workers.contract.jobs import JobResult
from workers.contract.output_check import OutputReport, OutputVerdict

if TYPE_CHECKING:
    from gateway.requests.outcome import TicketRunner

log = logging.getLogger(__name__)

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
        #: What ended it (the drain, its key's revocation), once its worker was told so
        #: (:meth:`TicketRunner.tell_cancelled`).
        self._cut: CallOff | None = None
        #: What :meth:`cut` was asked to end it for; the drain's unless a revocation said otherwise.
        self._why: CallOff = STOPPING
        #: A piece of its text came (a worker runs its job), released to the client or held back.
        self._heard = False
        #: The job's outcome (``workers.replies``), once it came.
        self._outcome: dict[str, Any] | None = None
        #: Under output rules (``checked``: the revision has one): what was received, judged and released.
        self._hold = runner.output_rules.hold() if runner.output_rules is not None and checked else None
        #: The verdict its worker was sent when the request timed out (:func:`.timeouts.tell_timed_out`): from
        #: then on the stream releases nothing more and answers no report (that verdict is the answer).
        self._timed_out: OutputVerdict | None = None
        #: The drain's cut was asked (:meth:`cut`): no verdict of a judgement still running is sent (q1 F2).
        self._cut_asked = False
        #: The judgement of its worker's report under way (:meth:`_answer`), cancelled by the cut.
        self._judging: asyncio.Future[OutputVerdict] | None = None
        #: Its worker was sent the verdict on its report: it records what that says, and the cut lets the
        #: result come (for :data:`CUT_GRACE_S`) rather than tell the client otherwise.
        self._answered = False
        #: That grace, once the cut began it; a second cut (a forced stop) ends it at once.
        self._grace: asyncio.TimerHandle | None = None
        #: The request timed out and the worker that began its job has until then (loop time) to report: a
        #: client leaving meanwhile leaves a timed-out request, not a cancelled one (:meth:`aclose`).
        self._timeout_grace_ends: float | None = None
        #: The text the client was sent (what a timed-out request's end keeps).
        self._delivered: list[str] = []

    def __aiter__(self) -> AsyncIterator[str | JobResult]:
        return self._events()

    async def _events(self) -> AsyncIterator[str | JobResult]:
        """The stream's text, then its result. At the request timeout the job is asked to stop; a job a
        worker began is relayed on for the grace (the runner's ``stop_grace_s``) until the worker's end comes,
        so the client gets what the worker generated and the request is charged it (:func:`.timeouts.timed_out`)."""
        runner, ticket = self._runner, self._ticket
        delivered = self._delivered
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
                self._timed_out = await tell_timed_out(runner.output_rules, ticket, self._hold, "".join(delivered))
                started = await stop_for_timeout(runner.redis, ticket)
                if not started:
                    await runner.withdraw_unstarted(self._queued)
                    if self._timed_out is not None and runner.output_rules is not None:  # no worker will read it
                        await runner.output_rules.discard(ticket.request_id)
                if started:  # no end within the grace (or Redis failed meanwhile): recorded here
                    self._timeout_grace_ends = asyncio.get_running_loop().time() + runner.stop_grace_s
                    with contextlib.suppress(RedisError, OSError):
                        async for piece in self._relay(runner.stop_grace_s, delivered):
                            yield piece
                self._finished = True  # the audit keeps what the client received, or what the worker generated
                result = await timed_out(runner, ticket, output="".join(delivered), started=started,
                                         outcome=self._outcome, verdict=self._timed_out)
            except (RedisError, OSError) as exc:
                self._finished = True
                raise await runner.queue_down(ticket, exc) from None
            missing = _unsent_text("".join(delivered), result)
            if missing:
                yield missing
            yield result
        except ApiError:
            # an end written by its worker (or lost to one) may not say what the stream's client got; a checked
            # stream cut by the stop told its worker (its cancelled verdict), an unchecked one could not
            if self._heard and (self._cut is None or self._hold is None):
                await record_delivered(runner, ticket, self._hold, "".join(delivered))
            raise
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
                elif event is _CUT:  # the stopping gateway's drain time is over (or its key was revoked):
                    # its job is cancelled now, not after the loop has stopped; the worker is told what the
                    # client received
                    why = self._why
                    await runner.tell_cancelled(ticket, self._hold, "".join(delivered), why)
                    self._cut = why
                    # no text came: its job may still wait in the queue, taken back (or, Redis gone, ended) here
                    ended = None if self._heard or self._queued is None else \
                        await end_cut_stream(runner, ticket, self._queued, why)
                    if ended is not None:
                        self._finished = True  # ended here: nothing left for aclose to abandon
                        raise why.answer(unrecorded=not ended)
                    raise why.answer()
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

    def cut(self, why: CallOff = STOPPING) -> None:
        """End the stream at its next event with an error event (503 ``shutting_down``): its gateway is
        stopping and its drain time is over (``gateway/drain.py``); ``why``: or its key was revoked
        (``gateway/auth/revocations.py``: 401 ``invalid_api_key``). Its job is cancelled as when the client
        leaves (:meth:`aclose`), its worker told what the client received; a judgement of its worker's report
        still running is abandoned, its verdict unsent (:meth:`_answer`). A stream whose worker has its verdict
        already waits up to :data:`CUT_GRACE_S` for its result, as a non-streamed request does
        (:func:`~gateway.requests.cancelled_ends.cut_while_running`): its worker records the end that verdict says."""
        if self._closed or self._finished:
            return
        if not self._cut_asked and self._grace is None:  # the first reason to end it is the one it is told
            self._why = why
        if self._answered:  # the worker records what its verdict says: its result is served if it comes soon
            if self._grace is None:
                self._grace = asyncio.get_running_loop().call_later(CUT_GRACE_S, self._pending.interrupt, _CUT)
            elif not self._grace.cancelled():  # cut again: the stop is forced (``Drain.hurry``), no more grace
                self._grace.cancel()
                self._pending.interrupt(_CUT)
            return
        if self._cut_asked:
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
        if not self._finished and self._timeout_grace_ends is not None:  # left during the timeout's grace
            self._finished = True
            self._runner.in_background(self._end_timed_out())
            return
        if not self._finished:  # the wait stays open: what the worker sends from now on is still heard
            self._runner.abandon(self._ticket, self._hold, self._pending, self._subscription, self._queued,
                                 cut=self._cut)
            return
        await self._subscription.aclose()

    async def _end_timed_out(self) -> None:
        """The client left while the worker of its timed-out request had its grace: the request still ends
        ``timed_out``, as it would have with the client there. Its worker was told to stop for the timeout
        (and, checked, what the client received): the rest of the grace is heard here, then the end is
        recorded as the stream would have (:func:`.timeouts.timed_out`: the worker's own entry, or this one).
        Before, the client's leaving cancelled the job over the timeout's stop: ``cancelled``, the worker's
        ``timed_out`` verdict replaced by a ``cancelled`` one.
        """
        assert self._timeout_grace_ends is not None
        runner, ticket = self._runner, self._ticket
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(self._subscription)
            left = max(0.0, self._timeout_grace_ends - asyncio.get_running_loop().time())
            if self._outcome is None:
                with contextlib.suppress(ResultTimeout, RedisError, OSError):
                    async for _ in self._relay(left, []):
                        pass  # nobody to send it to: what was sent before is what the end keeps
            try:
                await timed_out(runner, ticket, output="".join(self._delivered), started=True,
                                outcome=self._outcome, verdict=self._timed_out)
            except ApiError:
                pass  # the 504 (or the end another recorded) that no client is left to read


#: The event :meth:`StreamEvents.cut` puts in a stream's way.
_CUT = object()


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
