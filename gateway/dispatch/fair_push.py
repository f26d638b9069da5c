"""The gateway's push onto a fair-share queue: the message, the team's waiting count and, when needed,
the list's registration, in one Lua script (one ``EVALSHA``).

A worker only BRPOPs the fair lists it finds in the model's registry
(``workers/contract/fair_queues.py``), so a list must be registered before a
worker can take its job; registering on every push would cost a ``ZADD`` per
request, so each gateway process remembers the lists it registered and does
it again at most every :data:`REREGISTER_S` (the workers prune a list only
when it has been empty and unregistered for an hour). A list registered for
the first time wakes a worker blocked on the old set of lists (a token on
the wake list). See docs/architecture.md, "Fair share".
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from gateway.limits.scripts import Script
from workers.contract.fair_queues import registry_key, waiting_key, wake_key

#: How long a gateway trusts that a list it registered is still in the registry.
REREGISTER_S = 60.0
#: Most wake tokens kept: one wakes one blocked worker; more would only make idle workers spin.
WAKE_TOKENS = 64
#: Most lists a process remembers as registered (forgetting costs one ZADD on the next push).
_REMEMBERED = 10000

# KEYS: [1] the list, [2] waiting counts, [3] registry, [4] wake list.
# ARGV: [1] the message, [2] team field, [3] '1': register the list, [4] now (s).
_PUSH = f"""
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[3] == '1' and redis.call('ZADD', KEYS[3], 'GT', ARGV[4], KEYS[1]) == 1 then
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, {WAKE_TOKENS - 1})
end
return 1
"""
PUSH = Script(_PUSH)


class FairPush:
    """Pushes messages onto fair lists, registering each list at most every :data:`REREGISTER_S`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._registered: dict[str, float] = {}  # list key → monotonic time of its last registration

    async def push(self, model: str, team: str, key: str, message: str) -> None:
        """LPUSH ``message`` on ``key`` (a fair list of ``model``); raises ``RedisError`` or ``OSError``."""
        now = time.monotonic()
        last = self._registered.get(key)
        register = last is None or now - last >= REREGISTER_S
        await PUSH(self._redis, (key, waiting_key(model), registry_key(model), wake_key(model)),
                   (message, team, "1" if register else "0", repr(time.time())))
        if register:  # only once Redis took it: a failed push registers again next time
            if len(self._registered) >= _REMEMBERED:
                self._registered.clear()
            self._registered[key] = now
