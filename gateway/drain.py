"""A stopping gateway's drain: refuse new requests, let those in flight finish for a while, then end the rest.

Without it a stop (SIGTERM, Ctrl-C in ``govgate up``) left uvicorn waiting
for open connections until ``govgate up`` killed the API after 15 s: a
request already queued got no HTTP answer at all, a stream was cut with no
error event (h9 F4). With it (``gateway/serving.py`` runs it when the
server is told to stop, before uvicorn closes anything):

1. :meth:`Drain.begin`: new completion requests are refused 503
   ``shutting_down`` with a Retry-After (recorded ``rejected``, as other
   refusals before a decision), and ``/readyz`` answers 503, so a load
   balancer sends them elsewhere;
2. requests in flight go on until they end, for at most ``drain_s``
   (``GOVGATE_DRAIN_S``);
3. :meth:`Drain.cut`: those still running are ended cleanly: a non-streamed
   request gets its 503 ``shutting_down``, a stream an ``{"error": …}``
   event in its place; their jobs are cancelled as when a client leaves
   (a queued job is taken back and recorded ``cancelled`` here, a running
   one stops at its cancel key and its worker records ``cancelled`` with
   what the client received). A job that cannot be taken back because
   Redis is gone too (a stop that took it down with the API) is recorded
   ``cancelled`` here all the same, in the database, where the worker that
   takes it once Redis is back finds that end and does not generate
   (``end_unreachable`` in ``gateway/requests/cancelled_ends.py``).

A request whose body is still arriving is not admitted yet and has nothing
running to finish: :meth:`Drain.read_unless_stopping` ends its read at
:meth:`Drain.begin` and refuses it as one arriving during the drain, so it
does not hold the stop (probe p1 F2). Every endpoint's body is read through
it (``gateway/drain_reads.py``, probe q1 F4).

One object per served app (``app.state.drain``); all of it runs on the
event loop, so nothing here is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, Iterator, TypeVar

from gateway.api_errors import ApiError
from gateway.stop_timing import END_WAIT_S

log = logging.getLogger(__name__)

#: The error code of a request refused, or ended, because its gateway is stopping.
SHUTTING_DOWN = "shutting_down"
#: What a client refused or cut by a stopping gateway is told to wait before it tries again: another
#: replica (or this one, restarted) takes it then.
RETRY_AFTER_S = 2
#: How often the drain looks whether the requests in flight have ended.
POLL_S = 0.05
#: After a forced cut (a second Ctrl-C), how long at most the ended requests get to write their answers
#: (503 ``shutting_down``, their ends recorded) before the server's loop ends and cancels what is left.
FORCED_END_WAIT_S = 2.0

T = TypeVar("T")


def shutting_down(*, in_flight: bool, unrecorded: bool = False) -> ApiError:
    """The 503 of a request refused (``in_flight`` False) or ended (True) because the gateway is stopping.

    ``unrecorded``: an ended request whose job the gateway could neither cancel (Redis unreachable) nor
    record the end of (the audit store refused it): it may still run, and its client is told so.
    """
    if in_flight and unrecorded:
        message = ("The gateway is stopping and could not finish this request in time. It could reach neither "
                   "the queue to cancel the request nor the audit log to record its end, so the request may "
                   "still run (and be charged) once they are back; trying again may run it twice.")
    elif in_flight:
        message = ("The gateway is stopping and could not finish this request in time; the request was cancelled "
                   "(its end is recorded in the audit log when the gateway can reach it). Try again shortly.")
    else:
        message = "The gateway is stopping and takes no new requests; nothing was run. Try again shortly."
    return ApiError(503, SHUTTING_DOWN, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class Cut(Exception):
    """Raised by :meth:`Drain.unless_cut`: the drain's cut came before what was waited for."""


class Drain:
    """Whether the gateway is stopping, the completion requests in flight, and the cut that ends them."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        #: Set by :meth:`begin`: new completion requests are refused.
        self.draining = False
        #: Set by :meth:`cut`: those still in flight end now.
        self.is_cut = False
        self._cut_event: asyncio.Event | None = None
        #: The requests in flight, each with what ends it at the cut (None: it watches :meth:`wait_cut`).
        self._active: dict[int, Callable[[], None] | None] = {}
        #: The body reads under way (:meth:`read_unless_stopping`), each with what ends it at :meth:`begin`.
        self._reading: dict[int, Callable[[], None]] = {}
        #: The admission waits under way (:meth:`unless_cut`), each with what ends it at :meth:`cut`.
        self._waiting: dict[int, Callable[[], None]] = {}
        self._next = 0
        #: When :meth:`begin` ran (monotonic), for the cut's log line.
        self._began: float | None = None
        #: Set by :meth:`hurry`: the stop is forced, and the ended requests have :data:`FORCED_END_WAIT_S`.
        self.hurried = False
        self._hurried_event: asyncio.Event | None = None
        #: The admitted requests in flight at the cut (their ids): their ends, which their workers record a
        #: moment after it, are waited for before the closing audit checkpoint (``gateway/cut_ends.py``).
        self.cut_requests: set[str] = set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self._began = time.monotonic()
            if self.in_flight:
                log.info("stopping: no new requests; %d in flight get up to %gs to finish (GOVGATE_DRAIN_S)",
                         self.in_flight, self.drain_s)
            else:  # "0 in flight get up to 20s" read as a wait (probe q1, cosmetic)
                log.info("stopping: no new requests; none in flight")
            for end in list(self._reading.values()):
                end()

    def cut(self) -> None:
        """End every request still in flight (see the module docstring)."""
        if self.is_cut:
            return
        self.draining = self.is_cut = True
        if self._active:
            # the time the drain really ran: a second Ctrl-C cuts it short of GOVGATE_DRAIN_S (probe p1)
            ran = time.monotonic() - self._began if self._began is not None else 0.0
            log.warning("stopping: %d requests still in flight after %.1fs are ended now (503 shutting_down)",
                        len(self._active), ran)
        if self._cut_event is not None:
            self._cut_event.set()
        for end in list(self._active.values()):
            if end is not None:
                end()
        for end in list(self._waiting.values()):
            end()

    def ended_by_cut(self, request_id: str) -> None:
        """Note an admitted request that was in flight when the cut came (a no-op before the cut)."""
        if self.is_cut:
            self.cut_requests.add(request_id)

    def hurry(self) -> None:
        """The stop is forced (a second Ctrl-C): the requests the cut ended stop waiting for their workers'
        ends (:func:`~gateway.requests.cancelled_ends.cut_while_running` gives a worker 3 s, longer than
        the :data:`FORCED_END_WAIT_S` a forced stop waits: such a client got no answer at all, probe q1 F1);
        a stream whose worker had its verdict is cut again, which ends its grace the same way."""
        self.hurried = True
        if self._hurried_event is not None:
            self._hurried_event.set()
        for end in list(self._active.values()):  # a stream given a grace by the cut ends it now
            if end is not None:
                end()

    async def wait_hurried(self) -> None:
        """Return once :meth:`hurry` ran."""
        if self.hurried:
            return
        if self._hurried_event is None:
            self._hurried_event = asyncio.Event()
        await self._hurried_event.wait()

    async def wait_cut(self) -> None:
        """Return once :meth:`cut` ran."""
        if self.is_cut:
            return
        if self._cut_event is None:
            self._cut_event = asyncio.Event()
        await self._cut_event.wait()

    def enter(self, end: Callable[[], None] | None = None) -> Callable[[], None]:
        """Count a request as in flight until the returned ``leave`` is called (it may be called more than
        once); ``end`` is called at the cut (at once if the cut has passed)."""
        token = self._next
        self._next += 1
        self._active[token] = end
        if self.is_cut and end is not None:
            end()

        def leave() -> None:
            self._active.pop(token, None)
        return leave

    async def read_unless_stopping(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()`` (a part of a request's body: ``gateway/drain_reads.py`` reads every endpoint's through
        this), unless the gateway stops first: then 503 ``shutting_down``.

        A request whose body is still arriving has not been admitted, so
        nothing of it runs that the drain should let finish. Its read is
        cancelled at :meth:`begin` and it is refused as a request arriving
        during the drain is (at once, the body not read). Before (probe p1
        F2), a body trickling in held the stop for all of ``drain_s``, the cut
        could not end it, and uvicorn's graceful timeout then cancelled it: a
        plain-text 500 and a ``CancelledError`` traceback in the log.

        The read runs in the request's own task, cancelled by :meth:`begin`,
        rather than in a task of its own raced against the drain: this runs for
        every request with a body, and a task each would cost CPU on each.
        """
        if self.draining:
            raise shutting_down(in_flight=False)
        return await self._cancellable(read, self._reading, lambda: shutting_down(in_flight=False))

    async def unless_cut(self, wait: Callable[[], Awaitable[T]]) -> T:
        """``wait()`` (a request's admission waiting for its policy decision, or for the output rules' probe
        before its job is queued), unless the cut comes first: then :class:`Cut`, and the caller ends the
        request with its 503 ``shutting_down`` and records that end.

        Before (probe q1 F1), the cut had nothing to end such a request with: a graceful stop left it to
        uvicorn's timeout (a plain-text 500, a traceback), a forced one to the loop's end (no answer, no
        audit entry, an admitted request's reservation held until the lost-request sweep). Only such waits
        are cut short, not the admission's quick writes (its reservation, its ``request`` entry), whose
        outcome a cancel would leave unknown. As :meth:`read_unless_stopping`, it cancels the request's
        own task rather than race a task of its own.
        """
        if self.is_cut:
            raise Cut()
        return await self._cancellable(wait, self._waiting, Cut)

    async def _cancellable(self, call: Callable[[], Awaitable[T]], registry: dict[int, Callable[[], None]],
                           instead: Callable[[], BaseException]) -> T:
        """``call()`` in the request's own task, registered in ``registry`` so that the drain (its begin or its
        cut) can cancel it: that cancel alone becomes ``instead()``; any other cancel goes on as it came.

        The request's own task is cancelled rather than a task of its own raced against the drain: this runs
        for every completion request, and a task each would cost CPU on each.
        """
        task = asyncio.current_task()
        if task is None:  # not in a task (never so under an ASGI server): nothing to cancel it with
            return await call()
        ended = False

        def end() -> None:
            nonlocal ended
            ended = True
            task.cancel()

        token = self._next
        self._next += 1
        registry[token] = end
        try:
            return await call()
        except asyncio.CancelledError:
            if ended and task.uncancel() == 0:  # cancelled by the drain alone
                raise instead() from None
            raise
        finally:
            registry.pop(token, None)

    @contextlib.contextmanager
    def tracking(self, end: Callable[[], None] | None = None) -> Iterator[None]:
        """:meth:`enter` for the length of a block."""
        leave = self.enter(end)
        try:
            yield
        finally:
            leave()

    async def run(self, forced: Callable[[], bool] = lambda: False) -> None:
        """The whole drain: :meth:`begin`, wait up to ``drain_s`` for the requests in flight, :meth:`cut`, then
        wait (up to :data:`END_WAIT_S`) for the ended ones to answer. ``forced``: a second Ctrl-C, which cuts at
        once and then waits only :data:`FORCED_END_WAIT_S` for the ended ones' answers."""
        self.begin()
        await self._until_idle(self.drain_s, forced)
        self.cut()
        await self._until_idle(END_WAIT_S, forced)
        if forced():  # even so, the requests just ended get a moment to send their 503 (probe q1 F1)
            self.hurry()
            await self._until_idle(FORCED_END_WAIT_S, lambda: False)

    async def _until_idle(self, timeout_s: float, forced: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while self._active and not forced() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
