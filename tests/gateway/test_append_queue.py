"""The request path's audit appends, queued from the loop and written in batches by one thread.

A real SQLite store (migrated in a temporary folder); the store is wrapped
only to count how many appends each of its batches held. A second
``sqlite3`` connection holding the write lock (``BEGIN IMMEDIATE``) keeps
the thread busy while more appends queue behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import anyio
import pytest

from audit import AppendArgs, AuditEntry, AuditError, AuditStore, InvalidEntryError, make_engine, migrate, verify_chain
from audit.kinds import CHAIN_FORMAT_REQUEST_ID
from gateway.requests.append_queue import AppendQueue
from tests.gateway.cancel_turns import cancel_and_turn

pytestmark = pytest.mark.anyio


class CountingStore(AuditStore):
    """The real store, noting the size of each batch it is handed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def append_many(self, appends: Sequence[AppendArgs]) -> list[AuditEntry | Exception]:
        self.batches.append(len(appends))
        return super().append_many(appends)


def _db(tmp_path: Path, busy_timeout_s: float = 30.0) -> tuple[CountingStore, Path]:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=busy_timeout_s)
    migrate(engine)
    return CountingStore(engine), path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    store, _ = _db(tmp_path)
    yield store
    store.engine.dispose()


def _args(kind: str, request_id: str) -> AppendArgs:
    return AppendArgs(kind, request_id, "alice", "blue", "tiny", {"id": request_id}, "rev-1", None)


class _WriteLock:
    """Another connection holding SQLite's write lock until released."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self._conn.execute("ROLLBACK")
        self._conn.close()


async def _until(check: Any) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


async def test_concurrent_appends_each_get_their_own_entry_and_the_chain_is_whole(store: CountingStore) -> None:
    observed: list[str] = []
    queue = AppendQueue(store, observe=lambda kind, seconds: observed.append(kind))
    try:
        entries = await asyncio.gather(*(queue.append(_args("request", f"r{i}")) for i in range(64)))
    finally:
        await queue.aclose()
    assert [e.request_id for e in entries] == [f"r{i}" for i in range(64)]
    assert all(e.body == {"id": e.request_id} for e in entries)
    assert sum(store.batches) == 64 and sorted(observed) == ["request"] * 64
    result = verify_chain(store)
    assert result.ok and result.checked == 65


async def test_appends_queued_behind_a_busy_thread_go_in_one_batch_each_with_its_own_outcome(
        tmp_path: Path) -> None:
    store, path = _db(tmp_path)
    queue = AppendQueue(store)
    lock = _WriteLock(path)
    try:
        first = asyncio.ensure_future(queue.append(_args("request", "first")))
        await _until(lambda: store.batches == [1])  # the thread is inside that batch, waiting for the lock
        rest = [asyncio.ensure_future(queue.append(_args(kind, rid)))
                for kind, rid in [("request", "a"), ("no such kind", "b"), ("request", "c")]]
        await asyncio.sleep(0.05)
        lock.release()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await queue.aclose()
        store.engine.dispose()
    assert store.batches == [1, 3]
    assert [getattr(o, "request_id", None) for o in outcomes] == ["first", "a", None, "c"]
    assert isinstance(outcomes[2], InvalidEntryError)


async def test_a_transaction_the_database_refuses_fails_every_append_in_it(tmp_path: Path) -> None:
    store, path = _db(tmp_path, busy_timeout_s=0.3)
    queue = AppendQueue(store)
    lock = _WriteLock(path)
    try:
        outcomes = await asyncio.gather(*(queue.append(_args("request", f"r{i}")) for i in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, AuditError) for o in outcomes), outcomes
        lock.release()
        again = await queue.append(_args("request", "after"))  # the database free again: written
    finally:
        await queue.aclose()
    assert again.request_id == "after"
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "after"]
    store.engine.dispose()


async def test_a_cancelled_caller_waits_for_its_append_to_end_then_is_cancelled(tmp_path: Path) -> None:
    store, path = _db(tmp_path)
    queue = AppendQueue(store)
    lock = _WriteLock(path)
    try:
        caller = asyncio.ensure_future(queue.append(_args("request", "cancelled")))
        await _until(lambda: store.batches == [1])
        caller.cancel()
        await asyncio.sleep(0.05)
        assert not caller.done()  # still waiting for its append, which is under way
        lock.release()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "cancelled"]
    finally:
        await queue.aclose()
        store.engine.dispose()


async def test_closing_writes_what_is_queued_then_refuses_new_appends(store: CountingStore) -> None:
    queue = AppendQueue(store)
    pending = [asyncio.ensure_future(queue.append(_args("request", f"r{i}"))) for i in range(10)]
    await asyncio.sleep(0)  # queued
    await queue.aclose()
    assert verify_chain(store).checked == 11  # written before aclose returned
    assert [entry.request_id for entry in await asyncio.gather(*pending)] == [f"r{i}" for i in range(10)]
    with pytest.raises(AuditError, match="closed"):  # refused as a database that is down (503), not a 500
        await queue.append(_args("request", "late"))
    assert verify_chain(store).checked == 11


class FailingOnceStore(CountingStore):
    """The real store, whose first batch fails outside the database (a bug, say)."""

    def append_many(self, appends: Sequence[AppendArgs]) -> list[AuditEntry | Exception]:
        if not self.batches:
            self.batches.append(len(appends))
            raise RuntimeError("not the database's fault")
        return super().append_many(appends)


async def test_a_batch_that_fails_outside_the_database_fails_its_appends_and_the_thread_goes_on(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    store = FailingOnceStore(engine)
    queue = AppendQueue(store)
    try:
        with pytest.raises(AuditError, match="RuntimeError: not the database's fault"):
            await queue.append(_args("request", "first"))
        later = await queue.append(_args("request", "later"))
    finally:
        await queue.aclose()
        engine.dispose()
    assert later.request_id == "later"
    assert [e.request_id for e in store.iter_entries()] == [CHAIN_FORMAT_REQUEST_ID, "later"]


def _queued_on_a_loop_that_then_blocks(queue: AppendQueue, request_id: str,
                                       release: threading.Event) -> tuple[threading.Thread, list[Any]]:
    """Another thread's event loop that queues an append and, in the same turn, blocks until ``release``:
    its turn never ends while it is held (a loop busy in a synchronous call)."""
    outcome: list[Any] = []
    queued = threading.Event()

    def run() -> None:
        async def append() -> None:
            outcome.append(await queue.append(_args("request", request_id)))

        async def block() -> None:
            queued.set()
            release.wait()

        async def main() -> None:
            await asyncio.gather(append(), block())

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    assert queued.wait(30)
    return thread, outcome


async def test_an_append_is_written_while_another_loop_that_queued_one_is_busy(store: CountingStore) -> None:
    queue = AppendQueue(store)
    release = threading.Event()
    try:
        await queue.append(_args("request", "started"))  # the thread runs, and is idle again
        await _until(lambda: _idle(queue))
        other, other_outcome = _queued_on_a_loop_that_then_blocks(queue, "other loop", release)
        mine = asyncio.ensure_future(queue.append(_args("request", "this loop")))
        done, _ = await asyncio.wait([mine], timeout=10)
        assert done, "this loop's append waited for another loop's turn to end"
        assert mine.result().request_id == "this loop"
    finally:
        release.set()
        await queue.aclose()
    other.join(30)
    assert [e.request_id for e in other_outcome] == ["other loop"]


async def test_a_loop_stopped_before_its_turn_ended_does_not_stop_later_appends(store: CountingStore) -> None:
    queue = AppendQueue(store)
    try:
        await queue.append(_args("request", "started"))
        await _until(lambda: _idle(queue))

        def stopped_loop() -> None:  # queues an append, then stops (and is closed) before its next turn
            loop = asyncio.new_event_loop()
            task = loop.create_task(queue.append(_args("request", "stopped loop")))
            loop.call_soon(loop.stop)
            loop.run_forever()
            task.cancel()  # nobody will run it again
            loop.close()

        await asyncio.to_thread(stopped_loop)
        later = asyncio.ensure_future(queue.append(_args("request", "later")))
        done, _ = await asyncio.wait([later], timeout=10)
        assert done, "an append waited for a wake-up scheduled on a loop that was closed"
        assert later.result().request_id == "later"
    finally:
        await queue.aclose()
    assert [e.request_id for e in store.iter_entries()][1:] == ["started", "stopped loop", "later"]


def _idle(queue: AppendQueue) -> bool:
    """Whether the queue's thread is waiting for work (nothing queued, the thread inside its wait)."""
    batches = queue._batches
    with batches.ready:
        return not batches.queued and len(batches.ready._waiters) == 1  # type: ignore[attr-defined]


async def test_a_thread_that_cannot_be_started_fails_that_append_closed_and_the_next_one_starts_it(
        store: CountingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = AppendQueue(store)
    real_start = threading.Thread.start

    def exhausted(thread: threading.Thread) -> None:  # as when the process may start no more threads
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", exhausted)
    try:
        with pytest.raises(AuditError, match="start"):
            await queue.append(_args("request", "refused"))
        monkeypatch.setattr(threading.Thread, "start", real_start)
        later = asyncio.ensure_future(queue.append(_args("request", "later")))
        done, _ = await asyncio.wait([later], timeout=10)
        assert done, "an append waited for a thread that never started"
        assert later.result().request_id == "later"
    finally:
        monkeypatch.setattr(threading.Thread, "start", real_start)
        await queue.aclose()
    assert [e.request_id for e in store.iter_entries()][1:] == ["later"]  # the refused one was not written


async def test_a_queue_dropped_without_closing_ends_its_thread(store: CountingStore) -> None:
    """As a thread pool's threads end with their pool: a queue nobody holds (a request log discarded
    unclosed, in tests) kept its thread, and the store with it, until the process ended (and a process with
    a thread of its own no longer forks: ``audit verify --jobs`` spawned its workers)."""
    queue = AppendQueue(store, name="govgate-audit-append-dropped")
    await queue.append(_args("request", "r1"))
    [thread] = [t for t in threading.enumerate() if t.name == "govgate-audit-append-dropped"]
    del queue
    gc.collect()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive(), "the thread of a queue nobody holds is still waiting for appends"


async def test_a_caller_cancelled_again_and_again_still_waits_for_its_append(tmp_path: Path) -> None:
    """An anyio cancel scope (Litestar's streamed responses run in one) cancels its task again on every turn
    of the loop until the task leaves it: the second cancel ended the wait for the append, so the caller went
    on not knowing whether its entry was written (a terminal entry the database then refused was never kept)."""
    store, path = _db(tmp_path)
    queue = AppendQueue(store)
    lock = _WriteLock(path)
    left: list[str] = []

    async def caller(scope: anyio.CancelScope) -> None:
        with scope:
            await queue.append(_args("request", "cancelled"))
        left.append("after its append's end" if store.batches and _written(store, "cancelled") else "before")

    try:
        scope = anyio.CancelScope()
        task = asyncio.ensure_future(caller(scope))
        await _until(lambda: store.batches == [1])  # the thread is inside that batch, waiting for the lock
        await cancel_and_turn(scope, task, "the cancelled caller left before its append ended")
        lock.release()
        await task
        assert left == ["after its append's end"]
    finally:
        with contextlib.suppress(sqlite3.Error):
            lock.release()  # if the test failed before it did
        await queue.aclose()
        store.engine.dispose()


def _written(store: AuditStore, request_id: str) -> bool:
    return any(e.request_id == request_id for e in store.iter_entries())


async def test_behind_a_locked_database_a_backlog_is_refused_after_the_busy_timeout_not_a_batch_at_a_time(
        tmp_path: Path) -> None:
    """A thread waits for the process's other appends at most the busy timeout (``audit/writer.py``); queued
    here, the 600th of a backlog waited for the lock once per 256 before it (each batch its busy timeout),
    where every request should be refused 503 after about one."""
    store, path = _db(tmp_path, busy_timeout_s=0.3)
    queue = AppendQueue(store)
    lock = _WriteLock(path)
    try:
        first = asyncio.ensure_future(queue.append(_args("request", "first")))
        await _until(lambda: store.batches == [1])  # the thread is inside that batch, waiting for the lock
        outcomes = await asyncio.gather(*(queue.append(_args("request", f"r{i}")) for i in range(600)),
                                        return_exceptions=True)
        assert all(isinstance(o, AuditError) for o in outcomes), [o for o in outcomes if not isinstance(o, AuditError)][:1]
        with pytest.raises(AuditError):
            await first
    finally:
        lock.release()
        await queue.aclose()
        store.engine.dispose()
    assert store.batches[0] == 1 and len(store.batches) <= 2, store.batches  # not [1, 256, 256, 88]
