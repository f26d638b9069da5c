"""The gateway's push onto a fair-share queue: the message, the team's waiting count and, when needed,
the list's registration, in one Lua script (one ``EVALSHA``).

A worker only BRPOPs the fair lists it finds in the model's registry
(``workers/contract/fair_queues.py``), so a list must be registered before a
worker can take its job. The script asks the registry (``ZSCORE``, a read)
and writes it only when the list is missing or its time is older than
:data:`REREGISTER_S` (the workers prune a list only when it is empty and
has not been registered for five minutes). It asks only when the push found
the list empty (``LPUSH`` answers 1) or at every :data:`CHECK_EVERY`-th
length: a list that already held a job is registered (every push and
restore onto an empty list registers it, in the same step, and the prune
drops only empty lists), so under load, when the lists are not empty, the
push costs ``LPUSH``, ``HINCRBY`` and the ``HDEL`` of the place its admission held
(``gateway/limits/admitting.py``) only (until 2026-12-02 every push read
the registry), or, for a request reserved before its decision (which took
no place), the place check first: the admitting hash's and the waiting
hash's ``HGETALL`` (and the shares' ``HMGET`` when another team waits), a
full team refused with nothing pushed (``gateway/limits/places_lua.py``).
The periodic look finds a registry lost some other way (a
hand's ``DEL``) while jobs keep coming; a list busy for more than five
minutes may be pruned as soon as it empties, and its next push registers
it again. A list registered for the first time wakes
a worker blocked on the old set of lists (a token on the wake list; kept
for workers from before the take script, which order from a cached
registry). A push that finds the list empty (``LPUSH`` answers 1) rings the
model's bell for an idle worker (``workers/contract/take.py``): one
``RPOPLPUSH`` that moves an idle token, if any, to the bell; under load the
lists are not empty and no ring is sent. Such a push also counts the list
turned non-empty (``np`` in the model's tags hash) and marks the jobs the
workers' takes noted there (``tk``: each worker's last fair job, its team
and priority) for a look again at their start, each one whose list this
push's could come before (another team's, or a more urgent one of the same
team): ``SET … NX`` of the look-again mark in the job's state key, which
never overwrites a start or a cancel. A job taken just before then looks
again at its start and may give way to this one
(``workers/contract/repick.py``); one not marked starts with its claim
alone.

Not a cache in the gateway process: that would save the ``ZSCORE`` but could
not see a Redis restart or flush, and jobs pushed meanwhile would wait on
lists no worker looks at (tests/gateway/test_fail_closed.py's Redis restart
caught that). See docs/architecture.md, "Fair share".
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from gateway.limits.admitting import admitting_key
from gateway.limits.counters import QueueCheck
from gateway.limits.places_lua import PLACES_LUA
from gateway.limits.scripts import Script
from workers.contract.fair_queues import NOTED_FIELD, registry_key, tags_key, waiting_key, wake_key
from workers.contract.jobs import CANCEL_KEY_PREFIX, JOB_LOOK_AGAIN, LOOK_AGAIN_TTL_S, queue_for
from workers.contract.queue_layout import bell_key, idle_key

#: A list's registration is refreshed when a push finds it older than this (s).
REREGISTER_S = 60.0
#: A push that finds its list holding jobs reads the registry only at every CHECK_EVERY-th length.
CHECK_EVERY = 8
#: Most wake tokens kept: one wakes one blocked worker; more would only make idle workers spin.
WAKE_TOKENS = 64

# KEYS: [1] the list, [2] waiting counts, [3] registry, [4] wake list, [5] idle tokens, [6] bell, [7] tags,
#       [8] the model's admitting hash (gateway/limits/admitting.py), (with a check) [9] the shares hash,
#       [10] the live workers' set.
# ARGV: [1] the message, [2] team field, [3] now (s), [4] the jobs' state-key prefix, [5] the look-again
#       mark, [6] its ttl (s), [7] the request id ('' : none holds a place), [8] the queue's limit when the
#       push checks it ('': no check), [9] now (µs), [10] the model's members' prefix in the live workers' set.
# The state keys marked are named by the tags hash's noted jobs, not passed (one Redis, not a Cluster).
# A request reserved early (before its decision) took no place: the push counts the team's places as the
# admission does and takes one in the same step, or returns the admission's {'queue_full', ...} refusal and
# pushes nothing (gateway/limits/places_lua.py).
_PUSH = PLACES_LUA + f"""
if (ARGV[8] or '') ~= '' then
  local _, holds = places_held(KEYS[8], ARGV[7], tonumber(ARGV[9]))
  local total, mine, others = fair_places(KEYS[2], holds, ARGV[2])
  local refusal = fair_refusal({{limit = tonumber(ARGV[8]), team = ARGV[2], shares = KEYS[9], tags = KEYS[7],
                                workers = KEYS[10], prefix = ARGV[10], now = tonumber(ARGV[9])}},
                               total, mine, others)
  if refusal then return refusal end
end
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
if n == 1 then  -- a list turned non-empty: ring an idle worker, and tell the starts in progress (repick.py)
  redis.call('RPOPLPUSH', KEYS[5], KEYS[6])
  redis.call('HINCRBY', KEYS[7], 'np', 1)
  local noted = redis.call('HGET', KEYS[7], '{NOTED_FIELD}')
  if noted and noted ~= '' then
    local base, pri = string.match(KEYS[1], '^(.*):(%d)$')
    if not base then base, pri = KEYS[1], '0' end
    local team = string.match(base, '^model%.[^/]+/([^/]+)/[^/]+$')
    pri = tonumber(pri)
    -- each worker's last fair job taken: marked unless it started (or was cancelled) already, or this
    -- list cannot come before its own (the same team at the same or a less urgent priority)
    for id, other, other_pri in string.gmatch(noted, '%S+ (%S+) (%S+) (%d+)') do
      if other ~= team or pri < tonumber(other_pri) then
        redis.call('SET', ARGV[4] .. id, ARGV[5], 'NX', 'EX', ARGV[6])
      end
    end
  end
end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
-- the place its admission held moves into the waiting count in the same step: counted once, always
if ARGV[7] ~= '' then redis.call('HDEL', KEYS[8], ARGV[7]) end
-- a list that held jobs before this push is registered (a push registers an empty list, a restore its
-- list, and the prune drops only empty ones): the registry is read only when the list was empty, and
-- at every {CHECK_EVERY}th length (a registry lost some other way, e.g. deleted by hand, is found again)
if n % {CHECK_EVERY} ~= 1 then return 1 end
local now = tonumber(ARGV[3])
local seen = tonumber(redis.call('ZSCORE', KEYS[3], KEYS[1]))
if not seen or seen < now - {REREGISTER_S} then
  redis.call('ZADD', KEYS[3], 'GT', ARGV[3], KEYS[1])
  if not seen then
    redis.call('HDEL', KEYS[7], 'L')  -- the takes' copy of the registry: read again
    redis.call('LPUSH', KEYS[4], '1')
    redis.call('LTRIM', KEYS[4], 0, {WAKE_TOKENS - 1})
  end
end
return 1
"""
PUSH = Script(_PUSH)


async def fair_push(redis: aioredis.Redis, model: str, team: str, key: str, message: str, *,
                    request_id: str = "", check: QueueCheck | None = None) -> list | None:
    """LPUSH ``message`` on ``key`` (a fair list of ``model``; ``team`` as in the hashes), count it as
    waiting in place of the place ``request_id``'s admission held, register the list if needed, ring an
    idle worker if the list was empty; raises ``RedisError`` or ``OSError``.

    ``check`` (the fair :class:`QueueCheck` of the request's team): the request took no place at its
    admission; the team's places are checked first, in the same step. Returns the script's ``queue_full``
    reply when they are full (nothing was pushed), else None."""
    queue = queue_for(model)
    keys: tuple[str, ...] = (key, waiting_key(model), registry_key(model), wake_key(model), idle_key(queue),
                             bell_key(queue), tags_key(model), admitting_key(model))
    args: tuple = (message, team, repr(time.time()), CANCEL_KEY_PREFIX, JOB_LOOK_AGAIN, LOOK_AGAIN_TTL_S,
                   request_id, "", "", "")
    if check is not None:
        assert check.team == team, "the check is the pushed team's"
        keys += (check.keys[1], check.keys[3])  # the shares hash and the live workers' set
        args = (*args[:7], check.limit, time.time_ns() // 1000, check.worker_prefix)
    reply = await PUSH(redis, keys, args)
    return reply if isinstance(reply, list) else None
