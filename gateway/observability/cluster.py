"""What belongs to the whole deployment, read from Redis when asked: queue depth and live workers per model.

Every gateway replica would count these the same, so they are not counted
but read: one pipelined round trip (the queue lists' lengths, every
priority; the fair-share queues' waiting counts per team,
``workers.contract.fair_queues.waiting_key``; the live-workers set of :mod:`workers.contract.liveness`;
and the marks of workers that fail every job, :mod:`workers.contract.failing`),
bounded by a short timeout so a slow or absent Redis makes a scrape or a
readiness probe answer "unknown" quickly instead of hanging, and never
blocks the event loop (the async client).

A readiness probe also writes one short-lived key in the same round trip
(:data:`WRITE_PROBE_KEY`): a Redis that answers reads but refuses writes
(full under ``noeviction``, a failing snapshot under
``stop-writes-on-bgsave-error``, a read-only replica) refuses every request
(``usage_unavailable``), and a probe that only read would call it ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from workers.contract.queue_layout import queue_keys
from workers.contract.fair_queues import waiting_key
from workers.contract.jobs import queue_for
from workers.contract.failing import FAILING_KEY, READ_SCRIPT, Failing, failing_workers, holding_marks
from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY, live_counts

#: Longest a scrape or probe waits for Redis.
READ_TIMEOUT_S = 1.0
#: The key a readiness probe writes (any replica, any value) to learn whether Redis takes writes.
WRITE_PROBE_KEY = "govgate:ready-probe"
#: Its lifetime (ms): the key never outlives the probes that write it by more than this.
WRITE_PROBE_TTL_MS = 10_000


@dataclass(frozen=True)
class ClusterState:
    """Per model: jobs waiting in its queue, workers alive; ``error`` says why it could not be read."""

    queued: dict[str, int]
    workers: dict[str, int]
    error: str | None = None
    #: Why Redis refused the probe's write (redis-py's error class and Redis's reply), when asked to probe.
    write_refused: str | None = None
    #: Per model, its live workers that mark themselves failing every job, and why (models without any absent).
    failing: dict[str, Failing] = field(default_factory=dict)

    def serving(self, model: str) -> int:
        """Live workers of ``model`` that do not fail every job."""
        failing = self.failing.get(model)
        return self.workers.get(model, 0) - (failing.workers if failing else 0)


async def read_cluster(redis: aioredis.Redis, models: list[str], timeout_s: float = READ_TIMEOUT_S, *,
                       probe_write: bool = False) -> ClusterState:
    """Read the queues and live workers of ``models``; a failure is reported in ``error``, not raised.

    ``probe_write``: also write :data:`WRITE_PROBE_KEY`; a refusal is
    reported in ``write_refused`` (the reads still count).
    """
    try:
        with anyio.fail_after(timeout_s):
            async with redis.pipeline(transaction=False) as pipe:
                for model in models:
                    for key in queue_keys(queue_for(model)):
                        pipe.llen(key)
                    pipe.hvals(waiting_key(model))
                pipe.eval(LIVE_SCRIPT, 1, WORKERS_KEY)
                pipe.eval(READ_SCRIPT, 1, FAILING_KEY)
                if probe_write:
                    pipe.set(WRITE_PROBE_KEY, "1", px=WRITE_PROBE_TTL_MS)
                replies = await pipe.execute(raise_on_error=False)
    except TimeoutError:
        return ClusterState({}, {}, f"Redis did not answer within {timeout_s:g}s")
    except (RedisError, OSError) as exc:
        return ClusterState({}, {}, f"Redis: {type(exc).__name__}")
    write_refused = None
    if probe_write:
        probe = replies.pop()
        if isinstance(probe, Exception):
            write_refused = f"{type(probe).__name__}: {_first_line(probe)}"
    # An error reply to a read (a key of the wrong type, a script Redis refused) is a failure to read.
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is not None:
        return ClusterState({}, {}, f"Redis: {type(failed).__name__}: {_first_line(failed)}", write_refused)
    steps = len(queue_keys("")) + 1  # the plain lists, then the fair queues' counts per team
    queued = {model: sum(sum(int(v) for v in n) if isinstance(n, list) else int(n)
                         for n in replies[i * steps:(i + 1) * steps]) for i, model in enumerate(models)}
    live, marks = replies[-2], holding_marks(replies[-1])
    alive = live_counts(live)
    failing = {model: found for model, found in failing_workers(live, marks).items() if model in queued}
    return ClusterState(queued, {model: alive.get(model, 0) for model in models}, write_refused=write_refused,
                        failing=failing)


def _first_line(error: Exception) -> str:
    """An error reply's first line: Redis's message (a script's error may run on with its traceback)."""
    return str(error).split("\n", 1)[0].strip()
