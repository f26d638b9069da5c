"""When a principal (or team) at its ``in_flight`` limit may expect one of its requests to end: the 429's
``Retry-After`` of ``too_many_in_flight``.

A flat second told a principal whose requests wait behind a long queue to
come back at once, to be refused again at each retry until one ended. The
estimate is made from what the gateway can read in Redis, as the fair-share
``queue_full`` 429 is (``gateway/limits/fair_share.py``): the scope's
requests in flight (their slots, and each job's state key, which its worker
sets to ``started`` when generation begins), the requested model's mean
service time (``svc``, as the workers measure it; 1 s until they have), its
live job slots and the jobs waiting in its queue.

A started job ends in about one service time. A job not started yet waits
behind at most the model's waiting jobs that are not the scope's own, then
takes one service time: ``(waiting - own waiting) / live slots + 1`` service
times. The soonest of the scope's jobs decides; each is bounded by the time
its request has left before ``GOVGATE_REQUEST_TIMEOUT_S`` ends it (504, its
slot freed), and the answer is whole seconds from 1 to that timeout. The
scope's jobs for other models are estimated with the requested model's
figures (a slot does not record its model). Only read on a refusal.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.limits.counters import CountersUnavailable, Scope, UsageCounters
from gateway.limits.fair_share import service_ms
from workers.contract.fair_queues import MODE_FAIR, tags_key, waiting_key
from workers.contract.jobs import JOB_STARTED, cancel_key, queue_for
from workers.contract.liveness import WORKERS_KEY, live_slots
from workers.contract.queue_layout import queue_keys

#: What a refusal says when nothing can be read (Redis failed, or no slot is held any more): the old second.
UNKNOWN_WAIT_S = 1


def job_end_s(started: bool, ahead: int, mean_service_ms: float, live: int) -> float:
    """Seconds until one job ends: one service time if it runs, else after ``ahead`` jobs served by
    ``live`` job slots (at least one assumed: none alive, the first to come) and its own service time."""
    if started:
        return mean_service_ms / 1000
    return (ahead / max(1, live) + 1) * mean_service_ms / 1000


def soonest_end_s(jobs: list[tuple[bool, float]], waiting: int, mean_service_ms: float, live: int,
                  timeout_s: float, now: float) -> int:
    """Whole seconds (1 to ``timeout_s``) until the first of ``jobs`` (started?, admitted at) ends.

    ``waiting`` is the model's queue; the jobs not started are among it, so
    at most ``waiting`` minus them stand ahead of the first.
    """
    cap = max(1, math.ceil(timeout_s - 1e-9))
    if not jobs:
        return UNKNOWN_WAIT_S
    ahead = max(0, waiting - sum(1 for started, _ in jobs if not started))
    best = min(min(job_end_s(started, ahead, mean_service_ms, live), max(0.0, admitted + timeout_s - now))
               for started, admitted in jobs)
    return max(1, min(cap, math.ceil(best - 1e-9)))


async def in_flight_wait_s(redis: aioredis.Redis, counters: UsageCounters, scope: Scope, model: str, *,
                           queue_mode: str, timeout_s: float, now: float | None = None) -> int:
    """The ``Retry-After`` of a ``too_many_in_flight`` refusal of ``scope`` asking for ``model``.

    Never fails the refusal: a Redis that cannot be read gives :data:`UNKNOWN_WAIT_S`.
    """
    now = time.time() if now is None else now
    try:
        slots = await counters.in_flight_slots(scope, now=now)
        if not slots:
            return UNKNOWN_WAIT_S
        async with redis.pipeline(transaction=False) as pipe:
            pipe.mget([cancel_key(request_id) for request_id, _ in slots])
            pipe.hget(tags_key(model), "svc")
            pipe.zrangebyscore(WORKERS_KEY, f"({int(now)}", "+inf")
            if queue_mode == MODE_FAIR:
                pipe.hvals(waiting_key(model))
            else:
                for key in queue_keys(queue_for(model)):
                    pipe.llen(key)
            replies = await pipe.execute()
    except (CountersUnavailable, RedisError, OSError):
        return UNKNOWN_WAIT_S
    states, svc, members = replies[0], replies[1], replies[2]
    if queue_mode == MODE_FAIR:
        waiting = sum(max(0, _whole(v)) for v in replies[3])
    else:
        waiting = sum(int(n) for n in replies[3:])
    jobs = [(state == JOB_STARTED, admitted) for state, (_, admitted) in zip(states, slots)]
    return soonest_end_s(jobs, waiting, service_ms(svc), live_slots(members).get(model, 0), timeout_s, now)


def _whole(raw: object) -> int:
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0
