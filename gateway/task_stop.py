"""Stopping a gateway's background task so that closing the gateway always ends.

Why a helper and not ``task.cancel(); await task``: on Python 3.11 a cancel
that lands just as an ``asyncio.timeout`` expires is lost (the timeout turns
the cancellation into its own ``TimeoutError`` and forgets the outside
request; fixed in 3.12). redis-py reads pub/sub messages under such a
timeout and answers that case with "no message", so a listener looping on
``get_message(timeout=…)`` can shrug off a single cancel and run forever;
whoever awaited it hangs with it (the test suite did, about one close in
eight with a short ping interval). So: cancel again until the task has ended,
and give up loudly after a bound instead of hanging the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterable

log = logging.getLogger(__name__)

#: How often a task that ignored its cancel is cancelled again.
RECANCEL_EVERY_S = 0.1


async def stop_tasks(tasks: Iterable[asyncio.Task | None], *, within_s: float = 5.0) -> None:
    """Cancel every task and wait until each has ended, re-cancelling the ones that ignore it.

    A task still running after ``within_s`` is left (logged): closing must
    not hang on it. Its exception, if any, is retrieved so asyncio does not
    report it later.
    """
    live = {task for task in tasks if task is not None and not task.done()}
    if not live:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while live:
        for task in live:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("background tasks did not stop within %.1fs: %s", within_s,
                      ", ".join(sorted(task.get_name() for task in live)))
            return
        done, _ = await asyncio.wait(live, timeout=min(RECANCEL_EVERY_S, remaining))
        for task in done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        live -= done


async def stop_task(task: asyncio.Task | None, *, within_s: float = 5.0) -> None:
    """:func:`stop_tasks` for one task."""
    await stop_tasks([task], within_s=within_s)
