"""Awaiting job outcomes on the event loop, without a thread or a subscription per request.

Each gateway process subscribes once, at start, to its own reply channel;
every job it queues names that channel, and workers publish the job's
outcome and stream pieces there, tagged with the request id
(:mod:`workers.replies`). Outcomes are also stored briefly under a key, read
back after the pub/sub connection was lost; a report of an output handed
over to this gateway is not stored, so the fallback its worker kept in the
pending terminals is looked up then instead. Everything arrives sealed and
is opened here, so the rest of the gateway sees plain results. See
docs/architecture.md, section "gateway/requests and gateway/dispatch".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Collection

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.dispatch.lost_jobs import LOST_LOOKS_S, found, lost_outcome
from gateway.dispatch.redis_epoch import RedisEpoch
from gateway.task_stop import stop_task
from workers.contract.jobs import REPLY_PIECE, REPLY_RESULT, open_piece, open_result, parse_reply, result_key
from workers.contract.output_check import REPLY_OUTPUT, OutputReport
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.sealing import SealError, Sealer

log = logging.getLogger(__name__)

#: Outcome statuses that end a wait (the names Celery's result meta used).
_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
#: After a reconnect, when (seconds after it) the audit log is asked which waits ended without their outcome.
END_LOOKS_S = (0.0, 2.0, 10.0)
#: The outcome a wait is given when the audit log holds its request's end but Redis lost the worker's outcome:
#: a failure, which the request's handler answers with that end (``TicketRunner.result_of``: the recorded
#: end wins the terminal constraint, and answers as it records, a completion included).
ENDED_UNHEARD: dict[str, Any] = {"status": "FAILURE", "result": {
    "exc_type": "OutcomeLost", "exc_message": "its end was recorded while Redis lost the worker's outcome"}}


class ResultTimeout(TimeoutError):
    """No result arrived within the request's timeout."""


@dataclass(frozen=True)
class FoundFallback:
    """A handed-over output's fallback, found after the reply channel reconnected and no report came.

    The worker keeps it (``failed``/``output_unchecked``) in the pending
    terminals right before it publishes the report; a report published while
    the connection was down is lost, but the fallback is still there.
    ``entry`` holds the fields of the worker's
    :class:`~workers.contract.pending_terminals.PendingTerminal` (``kind``,
    ``body``: the output as logging allows, counts, timings; ``since``).
    """

    entry: dict[str, Any]


class _Inbox:
    """A job's pieces and output report, in order, and the one reader waiting for the next.

    Not an ``asyncio.Queue``: reading it while also watching the outcome cost
    a task and an ``asyncio.wait`` per event; here the reader waits on one
    future that a new item or the outcome settles, its deadline one timer.
    """

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        #: An output report (or the fallback standing for a lost one) was put here.
        self.reported = False
        #: Anything was put here: its job is alive (no lost-job look needs to ask Redis for it).
        self.heard = False

    def put(self, item: Any) -> None:
        self.heard = True
        if isinstance(item, (OutputReport, FoundFallback)):
            self.reported = True
        self.items.append(item)
        self.notify()

    def notify(self, *_: object) -> None:
        """Wake the reader (something arrived, or the outcome is settled)."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Until :meth:`notify` or ``deadline`` (loop time), whichever comes first."""
        wake = self._wake = loop.create_future()
        timer = loop.call_at(deadline, self.notify)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None


class PendingResult:
    """The wait for one job's outcome; await :meth:`get`, or iterate :meth:`events`."""

    def __init__(self, waiter: "ResultWaiter", task_id: str, future: asyncio.Future,
                 pieces: _Inbox | None = None) -> None:
        self._waiter = waiter
        self.task_id = task_id
        self._future = future
        self._pieces = pieces

    def queued(self, key: str, message: str) -> None:
        """Note where the job waits (its list, its message as pushed): a lost-job look asks Redis for it."""
        self._waiter._queued[self.task_id] = (key, message)

    def backlog(self) -> int:
        """Pieces (and reports) received but not yet read."""
        return len(self._pieces.items) if self._pieces is not None else 0

    def interrupt(self, item: Any) -> None:
        """Put ``item`` among the events, after those received so far (a stopping gateway's cut: its reader
        ends the request); nothing for a wait without events."""
        if self._pieces is not None:
            self._pieces.put(item)

    async def events(self, timeout_s: float) -> AsyncIterator[str | OutputReport | FoundFallback | dict[str, Any]]:
        """Text pieces as the worker publishes them, its output report (checked jobs), then the outcome dict.

        Pieces and the report are published before the result, on the same
        subscription, so every one is yielded before the meta. A handed-over
        output whose report was lost with the connection yields its
        :class:`FoundFallback` instead (and no outcome follows either). Raises
        :class:`ResultTimeout` when the whole exchange takes longer than ``timeout_s``.
        """
        assert self._pieces is not None, "expect(..., stream=True) or checked=True is needed to read events"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        inbox = self._pieces
        while True:
            while inbox.items:
                yield inbox.items.popleft()
            if self._future.done():
                yield self._future.result()
                return
            if deadline - loop.time() <= 0:
                raise ResultTimeout(f"no result for {self.task_id} within {timeout_s:g}s")
            await inbox.wait(loop, deadline)

    async def look_stored(self) -> None:
        """Resolve the wait now if the outcome is stored already (a wait begun after the job may have ended)."""
        await self._waiter._check_stored([self.task_id])

    async def get(self, timeout_s: float, *, look_stored: bool = False) -> dict[str, Any]:
        """The job's outcome (``status``, ``result``, …).

        ``look_stored`` reads the stored outcome first: for a wait that
        begins after the job may have ended (a request being cleaned up).
        A wait registered before its job was queued needs no look: the reply
        channel was subscribed before, and a publish missed while the
        connection was down is read back when it is re-established.
        """
        if look_stored:
            await self._waiter._check_stored([self.task_id])
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout_s)
        except asyncio.TimeoutError:
            raise ResultTimeout(f"no result for {self.task_id} within {timeout_s:g}s") from None


class ResultWaiter:
    """One pub/sub listener on this process's reply channel, resolving futures for every pending request."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer, *,
                 recorded_ends: Callable[[list[str]], Awaitable[Collection[str]]] | None = None) -> None:
        self._client = client
        self._sealer = sealer
        #: Which of these requests have a terminal entry in the audit log (:meth:`_look_for_ends`).
        self._recorded_ends = recorded_ends
        self._end_looks: asyncio.Task | None = None
        self._pubsub = client.pubsub()
        self._pending: dict[str, asyncio.Future] = {}
        self._streams: dict[str, _Inbox] = {}
        #: Requests whose worker may hand its output over (their fallbacks are looked up on reconnect).
        self._handed_over: set[str] = set()
        #: Fallbacks found on the last reconnect, delivered once the PING of this token comes back.
        self._found: tuple[bytes, dict[str, FoundFallback]] | None = None
        self._barriers = 0
        self._listener: asyncio.Task | None = None
        self._reply_channel = f"govgate:gateway:{uuid.uuid4().hex}"
        #: Set by the connection's connect callback: stored outcomes must be read.
        self._reconnected = False
        #: Whether a reconnect finds the data Redis held before (:mod:`gateway.dispatch.redis_epoch`).
        self._epoch = RedisEpoch(client)
        #: Where each queued job waits (:meth:`PendingResult.queued`), for :meth:`_look_for_lost_jobs`.
        self._queued: dict[str, tuple[str, str]] = {}
        self._lost_looks: asyncio.Task | None = None

    @property
    def reply_channel(self) -> str:
        """The channel workers answer this process on (it goes into every job, :attr:`GenerateJob.reply_to`)."""
        return self._reply_channel

    async def start(self) -> None:
        # Subscribed before any job names the channel, and for the process's life.
        await self._pubsub.subscribe(self._reply_channel)
        await self._epoch.note()
        self._listener = asyncio.create_task(self._listen(), name="govgate-result-listener")

    async def aclose(self) -> None:
        await stop_task(self._listener)
        await stop_task(self._end_looks)
        await stop_task(self._lost_looks)
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()

    @contextlib.asynccontextmanager
    async def expect(self, task_id: str, *, stream: bool = False, checked: bool = False,
                     handed_over: bool = False) -> AsyncIterator[PendingResult]:
        """Wait for ``task_id``'s outcome (its text pieces, its output report): enter before the job is queued.

        ``checked``: the job is under the output rules, its worker reports
        the output before the outcome (read through :meth:`PendingResult.events`).
        ``handed_over`` (with ``checked``): the worker may hand the output
        over, with no outcome after the report; if the connection is lost,
        the fallback it kept is looked up instead (:class:`FoundFallback`).
        No Redis command runs here: the reply channel is already subscribed.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        pieces: _Inbox | None = None
        if stream or checked:
            pieces = self._streams[task_id] = _Inbox()
            future.add_done_callback(pieces.notify)  # the outcome (or a cancel) ends the reader's wait
        if handed_over and checked:
            self._handed_over.add(task_id)
        try:
            yield PendingResult(self, task_id, future, pieces)
        finally:
            if self._pending.get(task_id) is future:
                del self._pending[task_id]
                self._handed_over.discard(task_id)
                self._queued.pop(task_id, None)
            if self._streams.get(task_id) is pieces:
                self._streams.pop(task_id, None)

    async def _check_stored(self, task_ids: list[str]) -> None:
        """Resolve waits whose outcome is stored (published while nobody could hear it)."""
        if not task_ids:
            return
        raws = await self._client.mget([result_key(task_id) for task_id in task_ids])
        for task_id, raw in zip(task_ids, raws):
            if raw is not None:
                self._resolve(task_id, raw)

    def _resolve(self, task_id: str, raw: bytes | str) -> None:
        future = self._pending.get(task_id)
        if future is None or future.done():
            return
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            log.error("unreadable result for %s", task_id)
            return
        if isinstance(meta, dict) and meta.get("status") in _FINAL:
            if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
                meta["result"] = open_result(meta["result"], self._sealer)
            self._settle(task_id, future, meta)

    def _settle(self, task_id: str, future: asyncio.Future, meta: dict[str, Any]) -> None:
        future.set_result(meta)
        inbox = self._streams.get(task_id)
        if inbox is not None:  # at once, not a loop turn later through the future's callback
            inbox.notify()

    def _piece(self, task_id: str, raw: bytes | str) -> None:
        queue = self._streams.get(task_id)
        if queue is None:
            return
        try:
            queue.put(open_piece(self._sealer, raw))
        except (SealError, TypeError, ValueError, KeyError):
            log.error("unreadable stream piece for %s", task_id)

    def _awaits_report(self, task_id: str) -> _Inbox | None:
        """The inbox of a handed-over request that is still waiting and has heard no report (else None)."""
        future = self._pending.get(task_id)
        inbox = self._streams.get(task_id)
        if future is None or future.done() or inbox is None or inbox.reported:
            return None
        return inbox

    def _opened_fallback(self, task_id: str, raw: bytes) -> FoundFallback | None:
        """A pending terminal entry of ``task_id`` if it is a hand-over's fallback (``not_before`` set)."""
        try:
            entry = json.loads(self._sealer.unseal(raw))
        except (SealError, TypeError, ValueError):
            log.error("unreadable pending terminal entry for %s", task_id)
            return None
        # An entry kept because the database refused a worker's end is not one: that worker also
        # delivered an outcome, read from its stored copy.
        if not isinstance(entry, dict) or not isinstance(entry.get("body"), dict) \
                or not entry.get("not_before") or entry.get("request_id") != task_id:
            return None
        return FoundFallback(entry)

    async def _look_for_fallbacks(self) -> None:
        """Find the fallbacks of handed-over requests that heard no report, and fence them with a PING.

        The worker keeps the fallback and then publishes the report (one
        pipeline): a fallback found here has its report either lost (published
        while the connection was down) or coming on the new subscription. The
        PING on the pub/sub connection, sent after the look, comes back after
        every message published before it, so a report in flight is heard
        first; the fallbacks of requests still without one are delivered then.
        """
        task_ids = [task_id for task_id in self._handed_over if self._awaits_report(task_id) is not None]
        if not task_ids:
            return
        raws = await self._client.hmget(PENDING_KEY, task_ids)
        found = {task_id: fallback for task_id, raw in zip(task_ids, raws)
                 if raw is not None and (fallback := self._opened_fallback(task_id, raw)) is not None}
        if not found:
            return
        self._barriers += 1
        token = f"govgate-fallbacks-{self._barriers}".encode()
        self._found = (token, found)
        await self._pubsub.ping(token)

    def _pong(self, data: Any) -> None:
        """A PING came back: deliver the fallbacks it fenced to requests that still heard no report."""
        if self._found is None:
            return
        token, found = self._found
        if (data.encode() if isinstance(data, str) else data) != token:
            return
        self._found = None
        for task_id, fallback in found.items():
            inbox = self._awaits_report(task_id)
            if inbox is not None:
                log.warning("the output report of %s was lost with the reply channel; its fallback stands in",
                            task_id)
                inbox.put(fallback)

    def _report(self, task_id: str, raw: bytes | str) -> None:
        queue = self._streams.get(task_id)
        if queue is None:  # nobody judges it here: the worker records the output unchecked
            log.warning("output report for %s, which this process does not wait for", task_id)
            return
        try:
            queue.put(OutputReport.opened(raw, self._sealer))
        except (SealError, TypeError, ValueError, KeyError):
            log.error("unreadable output report for %s", task_id)

    def _dispatch(self, raw: bytes | str) -> None:
        """Route one reply-channel message to its request."""
        try:
            kind, task_id, data = parse_reply(raw)
        except (ValueError, UnicodeDecodeError):
            log.error("unreadable message on the reply channel")
            return
        if kind == REPLY_RESULT:
            self._resolve(task_id, data)
        elif kind == REPLY_PIECE:
            self._piece(task_id, data)
        elif kind == REPLY_OUTPUT:
            self._report(task_id, data)

    def _on_connect(self, _connection: Any) -> None:
        """Called by redis-py after the pub/sub connection is (re)made and the channel re-subscribed."""
        self._reconnected = True

    async def _listen(self) -> None:
        # redis-py re-establishes a lost pub/sub connection on its own (sometimes
        # inside one get_message call, without raising): the connect callback
        # marks every reconnect, and outcomes published while nobody listened
        # are then read from their stored copies. It runs after redis-py's own
        # callback re-subscribed, so an outcome published at any moment is
        # either heard on the new subscription or already stored.
        assert self._pubsub.connection is not None, "start() subscribes first"
        self._pubsub.connection.register_connect_callback(self._on_connect)
        backoff = 0.1
        while True:
            if self._reconnected:
                self._reconnected = False
                await self._recover()
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any redis-py failure
                log.warning("result listener lost Redis (%s: %s); retrying in %.1fs", type(exc).__name__, exc,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._reconnect()
                continue
            if message is None:
                continue
            if message.get("type") == "message":
                self._dispatch(message["data"])
            elif message.get("type") == "pong":
                self._pong(message.get("data"))

    async def _reconnect(self) -> None:
        """Make the connection again now (its callback re-subscribes and marks it); the loop retries on failure."""
        try:
            await self._pubsub.connect()
        except Exception as exc:  # noqa: BLE001 - redis-py internals while reconnecting
            log.debug("reply channel not reconnected yet (%s: %s)", type(exc).__name__, exc)

    async def _recover(self) -> None:
        """Read the outcomes of pending requests that were stored while the connection was down.

        Stream pieces published meanwhile are lost; the result holds the whole
        text, and the stream sends what it missed before it ends
        (``stream_events._unsent_text``). A handed-over output's report is not
        stored: its fallback is looked up instead (:meth:`_look_for_fallbacks`).
        """
        try:
            await self._check_stored(list(self._pending))
            await self._look_for_fallbacks()
            lost = await self._epoch.lost()  # last: a failure before it has it asked again
        except (RedisError, OSError) as exc:
            log.warning("cannot read stored outcomes yet (%s); trying again", exc)
            self._reconnected = True
            await asyncio.sleep(0.1)
            return
        if self._recorded_ends is not None:
            await stop_task(self._end_looks)  # a reconnect again: its looks start over
            self._end_looks = asyncio.create_task(self._look_for_ends(), name="govgate-recorded-ends")
        if lost:
            waiting = [task_id for task_id, future in self._pending.items() if not future.done()]
            log.warning("Redis came back without the data it held (restarted empty?): the jobs of %d waiting "
                        "requests are looked for in %s s", len(waiting), " and ".join(f"{s:g}" for s in LOST_LOOKS_S))
            await stop_task(self._lost_looks)
            self._lost_looks = asyncio.create_task(self._look_for_lost_jobs(waiting), name="govgate-lost-jobs")

    def _unanswered(self, task_id: str) -> bool:
        """Whether ``task_id``'s wait is still open and has heard nothing from its worker."""
        future = self._pending.get(task_id)
        inbox = self._streams.get(task_id)
        return future is not None and not future.done() and (inbox is None or not inbox.heard)

    async def _look_for_lost_jobs(self, waiting: list[str]) -> None:
        """Answer the waits (of those open when Redis came back empty) whose job Redis no longer holds.

        See :mod:`gateway.dispatch.lost_jobs`: a job neither in its list nor begun at every one of
        :data:`LOST_LOOKS_S` is given :func:`lost_outcome`. A wait not yet queued when Redis came back
        pushed its job to this Redis, and is found there.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        candidates = set(waiting)
        for after in LOST_LOOKS_S:
            await asyncio.sleep(max(0.0, started + after - loop.time()))
            jobs = {task_id: self._queued[task_id] for task_id in candidates
                    if self._unanswered(task_id) and task_id in self._queued}
            if not jobs:
                return
            try:
                candidates = set(jobs) - await found(self._client, jobs)
            except (RedisError, OSError) as exc:  # Redis away again: its reconnect looks again
                log.warning("cannot look for the jobs Redis may have lost (%s)", exc)
                return
        for task_id in candidates:
            future = self._pending.get(task_id)
            if future is not None and self._unanswered(task_id):
                log.warning("the job of request %s was lost with Redis's data: no worker will run it", task_id)
                self._settle(task_id, future, lost_outcome())

    async def _look_for_ends(self) -> None:
        """Answer the waits whose request ended while Redis lost its worker's outcome.

        A worker whose channel to its gateway fails mid-job (Redis killed or
        restarted) records the request's end in the audit log (``failed``:
        ``worker_error`` with what it generated for a stream, ``output_unchecked``
        for a checked whole answer nobody could judge) but can neither publish nor
        store its outcome; the gateway, back on a new Redis, heard nothing and
        waited for the whole request timeout (120 s by default) before its
        timeout found that end (session 51 measured it: a stream on Gemma,
        Redis killed 1.5 s in and back 3 s later, answered after 120 s). Now
        the audit log is asked, at :data:`END_LOOKS_S` after each reconnect,
        which waits' requests have a terminal entry; those are given
        :data:`ENDED_UNHEARD`, which their handler answers with that entry.
        """
        assert self._recorded_ends is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        for after in END_LOOKS_S:
            await asyncio.sleep(max(0.0, started + after - loop.time()))
            waiting = [task_id for task_id, future in self._pending.items() if not future.done()]
            if not waiting:
                continue
            try:
                ended = await self._recorded_ends(waiting)
            except Exception as exc:  # noqa: BLE001 - the database may be down too: the timeout still ends them
                log.warning("cannot ask the audit log which requests ended while Redis was away: %s", exc)
                continue
            for task_id in ended:
                future = self._pending.get(task_id)
                if future is None or future.done():
                    continue
                log.warning("request %s ended while Redis lost its worker's outcome: answered from its audit entry",
                            task_id)
                self._settle(task_id, future, dict(ENDED_UNHEARD))
