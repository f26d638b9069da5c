"""Finding the queued jobs a Redis restarted empty lost, so that their clients hear it in seconds.

Before (probe s57 D4), a request whose job waited in a Redis that came back
empty waited its whole request timeout (120 s by default) and got 504
``timed_out``: no worker would ever take the job, and nothing said so. Now a
gateway whose reply channel reconnects to a Redis that lost its data
(:mod:`gateway.dispatch.redis_epoch`) looks, :data:`LOST_LOOKS_S` after the
reconnect, for the jobs of its waits that were then unanswered: a job still
in its list, or begun by a worker (its start claim, ``govgate:job:<id>``, which
a worker generating through the loss writes again at its next cancel look,
``workers/streams.py``), is left to run. A job found at none of the looks
was lost: its wait is given :func:`lost_outcome`, which the request's handler
records ``failed`` with ``queue_lost`` and answers 503 with ``Retry-After``
(``gateway/requests/outcome.py``). The first look waits for the audit log's
looks after a reconnect (``END_LOOKS_S`` in :mod:`gateway.dispatch.results`),
so that a job whose end was recorded is answered from that end instead; two
looks 10 s apart let a worker between its take and its start claim, or in a
long prompt's prefill (no cancel look), show itself. A job a worker still
runs unseen past both looks ends ``queue_lost`` too: its worker's later end
loses the terminal constraint, as a timed-out request's does.
"""

from __future__ import annotations

from typing import Any, Mapping

import redis.asyncio as aioredis

from workers.contract.jobs import cancel_key

#: After a reconnect that found Redis's data lost, when (seconds after it) the unanswered waits' jobs are
#: looked for; a job found at none of these looks is lost.
LOST_LOOKS_S = (10.0, 20.0)
#: The ``exc_type`` of :func:`lost_outcome`, which ``TicketRunner.result_of`` tells apart.
JOB_LOST = "JobLost"
#: Jobs looked for in one pipeline.
_PAGE = 100


def lost_outcome() -> dict[str, Any]:
    """The outcome a lost job's wait is given: a failure its handler records as ``queue_lost``."""
    return {"status": "FAILURE", "result": {
        "exc_type": JOB_LOST, "exc_message": "Redis restarted without its data while the job waited to be run"}}


def is_lost(meta: dict[str, Any]) -> bool:
    """Whether an outcome is :func:`lost_outcome`'s."""
    result = meta.get("result")
    return meta.get("status") == "FAILURE" and isinstance(result, dict) and result.get("exc_type") == JOB_LOST


async def found(client: aioredis.Redis, jobs: Mapping[str, tuple[str, str]]) -> set[str]:
    """The jobs (request id -> their list and message as pushed) Redis still knows: waiting in their list
    (``LPOS``), or begun by a worker (``EXISTS`` of the start claim). Raises ``RedisError``/``OSError``."""
    ids = list(jobs)
    known: set[str] = set()
    for start in range(0, len(ids), _PAGE):
        page = ids[start:start + _PAGE]
        async with client.pipeline(transaction=False) as pipe:
            for request_id in page:
                key, message = jobs[request_id]
                pipe.lpos(key, message)
                pipe.exists(cancel_key(request_id))
            replies = await pipe.execute()
        known.update(request_id for i, request_id in enumerate(page)
                     if replies[2 * i] is not None or replies[2 * i + 1])
    return known
