"""Sending admitted requests to the model's Celery queue.

If Redis cannot take the task now the request is refused (503) rather than
waited on blind. The job travels sealed, with its own deadline. In fair mode
(``GOVGATE_QUEUE_MODE=fair``) the queue is the job's team's and principal's
own (``workers/contract/fair_queues.py``, pushed by ``gateway/dispatch/fair_push.py``);
in fifo mode it is the model's one queue. See docs/architecture.md, sections
"gateway/requests and gateway/dispatch" and "Fair share".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.dispatch.celery_message import task_message
from gateway.dispatch.fair_push import fair_push
from gateway.limits.admitting import admitting_key
from gateway.limits.counters import QueueAtLimit, QueueCheck, queue_at_limit
from gateway.limits.places_lua import PLACES_LUA
from gateway.limits.scripts import Script
from gateway.observability.metrics import observe_withdrawn
from gateway.dispatch.job_payload import sealed_job
from workers.contract.queue_layout import bell_key, idle_key, queue_keys
from workers.contract.fair_queues import MODE_FAIR, MODE_FIFO, PLAIN_HINT, job_queue, tags_key, team_field, waiting_key
from workers.contract.jobs import GENERATE_TASK, GenerateJob, queue_for
from workers.contract.sealing import Sealer


async def queue_depth(redis: aioredis.Redis, model: str) -> int:
    """Requests waiting for a model (all priorities; its one queue and, in fair mode, its teams' queues
    by their waiting counts); raises ``RedisError`` or ``OSError``."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in queue_keys(queue_for(model)):
            pipe.llen(key)
        pipe.hvals(waiting_key(model))
        *lengths, per_team = await pipe.execute()
        return sum(lengths) + sum(int(n) for n in per_team)


class QueueUnavailable(RuntimeError):
    """The queue (Redis) did not accept the task."""


class NoPlace(Exception):
    """The push of a request that held no place (reserved early, before its decision) found the model's queue,
    or its team's places, full: nothing was queued. ``refusal`` says how full, as an admission's would."""

    def __init__(self, refusal: QueueAtLimit) -> None:
        super().__init__(f"queue full at the push: {refusal.waiting} waiting, limit {refusal.limit}")
        self.refusal = refusal


@dataclass(frozen=True)
class Queued:
    """Where a job waits: its list and its message exactly as pushed, so that the gateway can take it
    back while no worker has taken it (:meth:`Dispatcher.withdraw`); ``team``: its field in the model's
    waiting counts (fair mode), None in fifo mode; ``enqueued_at_ns``: the job's ``enqueued_at_ns`` (how
    long it has waited, for an end recorded while Redis cannot be reached: ``ENDED_UNSEEN_AFTER_S``)."""

    key: str
    message: str
    model: str
    team: str | None
    enqueued_at_ns: int = 0


# KEYS: [1] the list, [2] the model's waiting counts (fair mode; unused otherwise).
# ARGV: [1] the message as pushed, [2] its team's field ('' in fifo mode).
# A worker takes a message off its list and into its own unacked record in one script
# (workers/contract/take.py), so a message still in its list has not been taken: LREM removes it only
# then, atomically with the count, and says whether it did.
_WITHDRAW = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[2] ~= '' and redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""
WITHDRAW = Script(_WITHDRAW)

# fifo mode's push. KEYS: [1] the list, [2] the model's admitting hash (gateway/limits/admitting.py),
# [3] its tags hash, [4] its idle tokens, [5] its bell, [6..] (with a check) the model's lists.
# ARGV: [1] the message, [2] the request id whose place its admission took ('': it took none), [3] the plain
# lists' hint field, [4] the queue's limit when the push checks it ('': no check), [5] now (µs).
# The place the request's admission held moves into the list in the same step, so the admission
# script counts it once. A request reserved early (before its decision) took no place: the push counts
# the lists and the places held, as the admission does, and takes it in the same step, or refuses
# {'queue_full', depth} and pushes nothing (gateway/limits/places_lua.py). A push that turns the list
# non-empty sets the plain lists' hint (workers in fair mode may skip those lists until it says
# otherwise) and rings an idle worker waiting on the bell (workers/contract/take.py) in the same call.
_FIFO_PUSH = PLACES_LUA + """
if (ARGV[4] or '') ~= '' then
  local holds = places_held(KEYS[2], ARGV[2], tonumber(ARGV[5]))
  local waiting = lists_depth(6) + holds
  if waiting >= tonumber(ARGV[4]) then return {'queue_full', waiting} end
end
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
if n == 1 then
  redis.call('HSET', KEYS[3], ARGV[3], 1)
  redis.call('RPOPLPUSH', KEYS[4], KEYS[5])
end
return n
"""
FIFO_PUSH = Script(_FIFO_PUSH)


class Dispatcher:
    """Queues jobs for the workers: a Celery task message pushed on the async client, in one script that
    also takes back the place the request's admission held (``gateway/limits/admitting.py``), or for a
    request reserved before its decision checks the queue and takes its place (``enqueue``); fifo: an
    LPUSH, and when the list was empty the plain lists' hint and a ring for an idle worker; fair: one that
    also counts the team's waiting job, registers the list and rings."""

    def __init__(self, redis: aioredis.Redis, *, expires_s: float, sealer: Sealer, mode: str = MODE_FAIR) -> None:
        """``expires_s``: how long after queueing a job is still worth running (the request timeout);
        ``mode``: ``fair`` or ``fifo`` (``GOVGATE_QUEUE_MODE``)."""
        if mode not in (MODE_FAIR, MODE_FIFO):
            raise ValueError(f"queue mode must be {MODE_FAIR!r} or {MODE_FIFO!r}, not {mode!r}")
        self._redis = redis
        self._sealer = sealer
        self._expires_s = expires_s
        self._fair = mode == MODE_FAIR

    async def enqueue(self, job: GenerateJob, *, priority: int | None = None,
                      check: QueueCheck | None = None) -> Queued:
        """Queue ``job`` on its model's queue, the request id as task id; return where it waits.

        ``priority`` 0 is served first, 9 last (Celery on Redis); None is the default (5).
        ``check``: the request holds no place in the queue (its reservation was made early, before the
        policy decided: ``UsageCounters.admit``'s ``place``): the push counts the queue as the admission
        does and takes the place in the same step, or raises :class:`NoPlace` and queues nothing. None:
        its admission took its place, which the push takes back.
        """

        # The job carries its own deadline instead of Celery's ``expires``: Celery
        # drops an expired message without running the task, so nothing would
        # write the request's terminal entry if its gateway had gone meanwhile.
        # A worker that takes a job past its deadline records it as expired
        # (``workers.generation``).
        job = replace(job, deadline_ns=time.time_ns() + int(self._expires_s * 1e9))
        # Sealed: the prompt is ciphertext in Redis and its AOF. ``argsrepr``
        # (which Celery stores in the message and logs) names only the request.
        # The routing key is the queue too: a redelivered message goes back to its own list.
        queue = job_queue(job.model, job.team, job.principal) if self._fair else queue_for(job.model)
        key, message = task_message(GENERATE_TASK, job.request_id, [sealed_job(job, self._sealer)],
                                    queue=queue, priority=priority, argsrepr=f"(<sealed job {job.request_id}>,)")
        # One script (one round trip) on the event loop's own client: no thread, no retries that
        # could hold the request for seconds if Redis is gone.
        team = team_field(job.team) if self._fair else None
        held = "" if check is not None else job.request_id  # the place its admission took, if any
        try:
            if team is not None:
                refused = await fair_push(self._redis, job.model, team, key, message, request_id=held, check=check)
            else:
                plain = queue_for(job.model)
                keys = (key, admitting_key(job.model), tags_key(job.model), idle_key(plain), bell_key(plain))
                args: tuple = (message, held, PLAIN_HINT, "", "")
                if check is not None:
                    keys += check.keys
                    args = (message, held, PLAIN_HINT, check.limit, time.time_ns() // 1000)
                reply = await FIFO_PUSH(self._redis, keys, args)
                refused = reply if isinstance(reply, list) else None
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"the queue did not accept the request: {exc}") from exc
        if refused is not None:
            assert check is not None
            raise NoPlace(queue_at_limit(refused, check))
        return Queued(key, message, job.model, team, job.enqueued_at_ns)

    async def withdraw(self, queued: Queued) -> bool | None:
        """Take a job back from its list if no worker has taken it yet (its client went away): True when
        it was, and its place in the queue is free (its team's waiting count lowered with it); False when
        a worker has it; None when Redis cannot answer (falsy too: the cancel key then stops it, if that
        could be written; a caller that must know tells None apart). Never raises."""
        try:
            withdrawn = bool(await WITHDRAW(self._redis, (queued.key, waiting_key(queued.model)),
                                            (queued.message, queued.team or "")))
        except (RedisError, OSError):
            return None
        if withdrawn:
            observe_withdrawn(queued.model, queued.enqueued_at_ns)
        return withdrawn
