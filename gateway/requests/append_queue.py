"""The request path's audit appends, written in batches by one thread of their own.

Every request makes two appends (its request entry, its terminal entry),
and neither may run on the event loop: SQLite may wait for its write lock,
PostgreSQL answers over the network. Until 2026-12-02 each ran on a thread
of a 32-thread pool, joining the store's group commit there: per append a
hand-off to a pool thread, a wait for the group's leader, a hand-back to
the loop, and up to 32 threads taking turns at the GIL. Under load that
cost the gateway more CPU than the appends' own work (``bench/overhead.py``
at c=32: gateway 2.3–2.5 ms of CPU per request with the pool, 1.8–1.9 with
the appends run on the loop itself, which a gateway cannot do; see
docs/architecture.md, "The request path's audit appends").

Here the loop only queues an append; one thread takes everything queued
and hands it to the store at once (:meth:`audit.store.AuditStore.append_many`:
one group commit, a statement per append), then resolves the
batch's futures with one call into the loop. A thread that is busy needs
no wake-up; an idle one gets one per turn of the loop that queued
something (woken at once per append, it cost 2–9 % more of the gateway's
CPU in three alternating pairs: the wake-ups were an eighth of its samples). The wake is per loop: an
append never waits for another loop's turn to end (that loop may be busy in a
synchronous call, or stopped and closed before its wake ran, which left every
later append unwritten until 2026-12-02). Appends made meanwhile by other
threads of the process (key administration, the pending terminals' writer)
join the same group commit as before.

Failure is per append, as before: an append the store refuses (a duplicate
terminal entry, a bad argument) fails alone; a transaction the database
refuses (locked past the busy timeout, gone) fails every append in it,
each caller getting the store's error (``AuditError``); an append that
waited the busy timeout for those queued before it is refused unwritten,
as a thread that waited that long for the writer is. A caller that is
cancelled still waits for its append's end, then is cancelled: a request
never leaves an append half-known (as with the pool, and anyio before it),
however often it is cancelled meanwhile (:func:`~gateway.requests.blocking_calls.wait_out`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from audit import AppendArgs, AuditEntry, AuditError, AuditStore
from audit.db import busy_timeout_s
from gateway.requests.blocking_calls import wait_out

log = logging.getLogger(__name__)

#: Appends handed to the store at once at most (a backlog is written over several transactions).
MAX_BATCH = 256


@dataclass(frozen=True, slots=True)
class _Queued:
    args: AppendArgs
    future: asyncio.Future[AuditEntry]
    loop: asyncio.AbstractEventLoop
    #: When (monotonic) it has waited for the appends before it as long as the database's lock is waited for.
    deadline: float


class AppendQueue:
    """Appends to ``store`` made from event loops, written by one thread in batches.

    ``observe(kind, seconds)`` is told each append's share of its batch's
    time (the batch's duration: the appends in it commit together). A queue
    nobody holds any more ends its thread once what is queued is written,
    as a thread pool's threads end with their pool (the thread holds only
    :class:`_Batches`, never the queue).
    """

    def __init__(self, store: AuditStore, *, observe: Callable[[str, float], None] | None = None,
                 name: str = "govgate-audit-append") -> None:
        self._name = name
        self._batches = _Batches(store, observe)
        self._thread: threading.Thread | None = None
        #: The loops on which a wake of the thread is scheduled (see :meth:`append`).
        self._waking: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        weakref.finalize(self, self._batches.close)

    async def append(self, args: AppendArgs) -> AuditEntry:
        """Write ``args``' entry; its entry as stored, or the store's error. A cancellation meanwhile is
        raised once the append has ended."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEntry] = loop.create_future()
        batches = self._batches
        with batches.ready:
            if batches.closing:
                raise AuditError("audit append failed: the gateway is stopping (its audit append queue is closed)")
            batches.queued.append(_Queued(args, future, loop, time.monotonic() + batches.wait_s))
            if self._thread is None:
                thread = threading.Thread(target=batches.run, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread to be had: refused like a database that is down
                    batches.queued.pop()  # nothing else is queued: no thread ran to take it
                    raise AuditError(f"audit append failed: cannot start its thread ({exc})") from exc
                self._thread = thread
            elif batches.waiting and loop not in self._waking:
                # Woken once this turn of the loop is over, so the appends the same turn queues (requests
                # progress in clumps) share one wake. Per loop: another loop's wake may come late (that
                # loop busy in a synchronous call) or never (stopped before its next turn, and closed).
                self._waking.add(loop)
                loop.call_soon(self._wake, loop)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await wait_out(future)  # the append goes on regardless; the cancel waits for its end
            raise

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._batches.ready:
            self._waking.discard(loop)
            self._batches.ready.notify()

    async def aclose(self) -> None:
        """Refuse new appends (AuditError: the request is refused 503, as with a database that is down) and
        wait (off the loop) until those queued are written."""
        self._batches.close()
        with self._batches.ready:
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)


class _Batches:
    """What the append thread shares with its :class:`AppendQueue`: the queued appends, under ``ready``."""

    def __init__(self, store: AuditStore, observe: Callable[[str, float], None] | None) -> None:
        self._store = store
        self._observe = observe
        #: The longest an append waits for those queued before it (see :meth:`_write`).
        self.wait_s = busy_timeout_s(store.engine)
        self.ready = threading.Condition(threading.Lock())
        self.queued: list[_Queued] = []
        self.closing = False
        #: The thread is waiting for appends (it needs a wake for the next one).
        self.waiting = False

    def close(self) -> None:
        """Refuse new appends; the thread ends once those queued are written."""
        with self.ready:
            self.closing = True
            self.ready.notify()

    def run(self) -> None:
        while True:
            with self.ready:
                while not self.queued and not self.closing:
                    self.waiting = True
                    self.ready.wait()
                    self.waiting = False
                if not self.queued:
                    return  # closing, and everything written
                batch, self.queued = self.queued[:MAX_BATCH], self.queued[MAX_BATCH:]
            self._write(batch)

    def _write(self, taken: list[_Queued]) -> None:
        """Write ``taken`` and hand each caller its outcome; never raises (the thread serves every later append).

        An append that has already waited the busy timeout for those before
        it is refused unwritten, as a thread waiting that long for the
        process's other appends is (``audit/writer.py``): behind a locked
        database a backlog's appends otherwise waited one busy timeout per
        batch before theirs, the last of a few thousand for minutes, where a
        request is refused after about one (until 2026-12-02).
        """
        now = time.monotonic()
        late = [q for q in taken if q.deadline <= now]
        batch = [q for q in taken if q.deadline > now] if late else taken
        if late:
            log.error("refusing %d audit appends that waited %g s for those before them", len(late), self.wait_s)
            self._resolve_all([(q, AuditError(f"audit append failed: waited {self.wait_s:g} s for this process's "
                                              "other audit appends")) for q in late])
            if not batch:
                return
        started = time.perf_counter()
        try:
            outcomes: list[AuditEntry | Exception] = list(self._store.append_many([q.args for q in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} appends")
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch must get an answer
            log.exception("the audit append thread failed on a batch of %d", len(batch))
            failed = AuditError(f"audit append failed: {type(exc).__name__}: {exc}")
            outcomes = [failed] * len(batch)
        if self._observe is not None:
            elapsed = time.perf_counter() - started
            try:
                for queued in batch:
                    self._observe(queued.args.kind, elapsed)
            except Exception:  # noqa: BLE001 - a metric must not stop the audit
                log.exception("cannot observe the audit appends' time")
        self._resolve_all(list(zip(batch, outcomes)))

    @staticmethod
    def _resolve_all(outcomes: list[tuple[_Queued, AuditEntry | Exception]]) -> None:
        """Hand each caller its outcome, with one call into each loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Queued, AuditEntry | Exception]]] = {}
        for queued, outcome in outcomes:
            by_loop.setdefault(queued.loop, []).append((queued, outcome))
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass


def _resolve(done: list[tuple[_Queued, AuditEntry | Exception]]) -> None:
    """On the loop: each future gets its append's outcome."""
    for queued, outcome in done:
        if queued.future.done():
            continue
        if isinstance(outcome, Exception):
            queued.future.set_exception(outcome)
        else:
            queued.future.set_result(outcome)
