"""The request path's blocking calls (the audit store) on threads of its own.

Every request makes two audit appends, each on a thread: SQLite may wait
for its write lock and PostgreSQL answers over the network, so neither may
run on the event loop. ``anyio.to_thread.run_sync`` spent about 75 µs of
CPU per hop in a micro-benchmark at 32 calls in flight (its capacity
limiter, cancel scopes and backend lookups); this pool's hop costs about
42 µs (``loop.run_in_executor`` on a dedicated ``ThreadPoolExecutor``,
shielded). It keeps anyio's behaviour on cancellation: a call once
started, or queued, runs to its end, and the caller's cancellation is
raised after it, so a cancelled request never leaves an append half-known.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: Threads at most: as many appends at once as anyio's default limiter allowed (40), about; created as needed.
DEFAULT_THREADS = 32


class BlockingCalls:
    """A thread pool for one component's blocking calls; :meth:`aclose` waits for those still running."""

    def __init__(self, threads: int = DEFAULT_THREADS, *, name: str = "govgate-blocking") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` on a thread; a cancellation meanwhile is raised once it has returned."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await wait_out(future)  # the call goes on regardless; the cancel waits for its end
            raise

    async def aclose(self) -> None:
        """Refuse new calls and wait for those queued or running (off the loop)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


async def wait_out(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancels the caller meanwhile (the caller re-raises its own).

    One wait is not enough: an anyio cancel scope (Litestar runs a streamed
    response in one) cancels its task again on every turn of the loop until
    the task leaves it, and until 2026-12-02 the second cancel ended the wait,
    so a cancelled request went on not knowing how its append or call ended
    (a terminal entry the database refused then was never kept). The wait
    is bounded by the call's own: the store's, at the busy timeout or the
    stall watch's bound.
    """
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
