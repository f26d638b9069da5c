"""Counter calls that failed and must still happen, retried in the background until Redis answers.

A give-back (a release, an undo, a settle) that cannot reach Redis would
otherwise leave a reservation held: the in-flight slot until its TTL, the
tokens charged to the day. And an admit call that timed out may still run
once a frozen Redis reads its socket again, reserving for a request that
was refused meanwhile. Each such call is idempotent, so it is simply sent
again, in a task of its own (the client's answer does not wait for it),
with a growing pause, until it goes through or ``give_up_after_s`` has
passed (then an error is logged). docs/architecture.md, "Usage counters".

At most ``most`` calls are kept retrying at once: during a long outage every
refused request would start one (a task, and a connection attempt every few
seconds, each), while the reservations that can really be left behind are
bounded by the connections that were open when Redis froze. Past the bound a
call is dropped with an error logged (at most once a minute): its slot
frees at its TTL, as before the retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class LaterCalls:
    """Background retries of idempotent counter calls; bounded in time, logged, closed with the counters."""

    def __init__(self, retry_on: tuple[type[BaseException], ...], *, give_up_after_s: float,
                 first_pause_s: float = 0.25, longest_pause_s: float = 5.0, most: int = 1000) -> None:
        self._retry_on = retry_on
        self._most = most
        #: Calls dropped because ``most`` were retrying already (for operators and tests).
        self.dropped = 0
        self._dropped_logged_at = float("-inf")
        self._give_up_after_s = give_up_after_s
        self._first_pause_s = first_pause_s
        self._longest_pause_s = longest_pause_s
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, what: str, call: Callable[[], Awaitable[object]], *, failed: BaseException | None = None) -> None:
        """Run ``call`` now and again until it succeeds; ``what`` names it in the log.

        ``failed``: why the caller's own attempt failed (logged here, once).
        """
        if len(self._tasks) >= self._most:
            self.dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged_at >= 60.0:
                self._dropped_logged_at = now
                log.error("%s not retried: %d counter calls are retrying already (%d dropped so far); its "
                          "reservation holds until its in-flight TTL", what, len(self._tasks), self.dropped)
            return
        task = asyncio.get_running_loop().create_task(self._run(what, call, failed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, what: str, call: Callable[[], Awaitable[object]], failed: BaseException | None) -> None:
        deadline = time.monotonic() + self._give_up_after_s
        pause, failures = self._first_pause_s, 0
        if failed is not None:
            failures = 1
            log.warning("%s failed (%s); retrying in the background until Redis answers", what, failed)
        while True:
            try:
                await call()
            except self._retry_on as exc:
                failures += 1
                if failures == 1:
                    log.warning("%s failed (%s); retrying in the background until Redis answers", what, exc)
                if time.monotonic() + pause > deadline:
                    log.error("gave up %s after %d tries: %s", what, failures, exc)
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, self._longest_pause_s)
                continue
            if failures:
                log.info("%s went through after %d failed tries", what, failures)
            return

    async def aclose(self, grace_s: float = 10.0) -> None:
        """Give the calls still retrying ``grace_s`` (about one Redis timeout) to go through, then stop them."""
        if not self._tasks:
            return
        tasks = set(self._tasks)
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        if pending:
            log.error("%d counter call(s) still retrying at shutdown were abandoned; their reservations "
                      "hold until their in-flight TTL", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
