"""The Lua scripts that check and record usage, each one atomic step in Redis.

The keys they read and write, and why a minute window is a sorted set plus a
running sum: docs/architecture.md, "Usage counters".
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

#: The counters the scripts keep per scope, in the order ``usage()`` returns
#: them and the reserve script reads the limits (one limit per counter, in
#: ``gateway.limits.catalogue`` order). A limit with a new counter needs a key
#: and a line in ``usage()`` and ``wait()`` here.
COUNTERS = ("requests_last_minute", "tokens_last_minute", "tokens_today", "tokens_this_month", "in_flight")

# Lua quirks this code respects: numbers concatenated into strings are
# formatted with %.14g (so µs timestamps would lose digits; numbers passed to
# redis.call are formatted with %.17g and stay exact); a Lua number returned
# to Redis becomes an integer (fractions are truncated); a missing value
# from GET/HGET/HMGET is `false`, not nil.

_PRELUDE = """
local NOW = tonumber(ARGV[1])
local WINDOW = tonumber(ARGV[2])
local NSCOPES = tonumber(ARGV[3])
local ID = ARGV[4]

-- The six keys of scope i; the scope keys start at KEYS[first].
local function scope(i, first)
  local b = first + (i - 1) * 6
  return {win = KEYS[b], wtok = KEYS[b + 1], wsum = KEYS[b + 2],
          day = KEYS[b + 3], mon = KEYS[b + 4], fly = KEYS[b + 5]}
end

-- Drop window entries at or before NOW - WINDOW (the window is (NOW-WINDOW, NOW]),
-- subtracting their tokens from the running sum; drop expired in-flight entries.
local function prune(s)
  local cutoff = NOW - WINDOW
  while true do
    local gone = redis.call('ZRANGEBYSCORE', s.win, '-inf', cutoff, 'LIMIT', 0, 256)
    if #gone == 0 then break end
    local freed = 0
    for _, v in ipairs(redis.call('HMGET', s.wtok, unpack(gone))) do
      if v then freed = freed + tonumber(v) end
    end
    redis.call('HDEL', s.wtok, unpack(gone))
    redis.call('ZREM', s.win, unpack(gone))
    if freed ~= 0 then redis.call('DECRBY', s.wsum, freed) end
  end
  if redis.call('EXISTS', s.win) == 0 then redis.call('DEL', s.wtok, s.wsum) end
  redis.call('ZREMRANGEBYSCORE', s.fly, '-inf', NOW)
end

-- Current usage, one value per counter in COUNTERS order.
local function usage(s)
  prune(s)
  return {redis.call('ZCARD', s.win),
          tonumber(redis.call('GET', s.wsum) or 0),
          tonumber(redis.call('GET', s.day) or 0),
          tonumber(redis.call('GET', s.mon) or 0),
          redis.call('ZCARD', s.fly)}
end
"""

_RESERVE = _PRELUDE + """
-- KEYS[1] request record, then six keys per scope.
-- ARGV 5 tokens, 6 in-flight expiry, 7 window ttl ms, 8 in-flight ttl ms, 9 day ttl ms,
-- 10 month ttl ms, 11 record ttl ms, 12 day end, 13 month end, 14.. five limits per scope (-1: none)
local TOKENS = tonumber(ARGV[5])
local held = redis.call('HMGET', KEYS[1], 'state', 'tokens', 'at')
if held[1] then return {'held', held[1], held[2], held[3]} end

-- Microseconds until limit j of scope s admits the request, given it fails now.
local function wait(j, s, used, limit)
  if j == 1 then
    -- the (used + 1 - limit)-th oldest request has to leave the window
    local entry = redis.call('ZRANGE', s.win, used - limit, used - limit, 'WITHSCORES')
    if entry[2] then return tonumber(entry[2]) + WINDOW - NOW end
    return WINDOW
  elseif j == 2 then
    if TOKENS > limit then return WINDOW end
    local must_free, freed, start = used + TOKENS - limit, 0, 0
    while true do
      local batch = redis.call('ZRANGE', s.win, start, start + 255, 'WITHSCORES')
      if #batch == 0 then return WINDOW end
      local ids = {}
      for k = 1, #batch, 2 do ids[#ids + 1] = batch[k] end
      local toks = redis.call('HMGET', s.wtok, unpack(ids))
      for k = 1, #ids do
        if toks[k] then freed = freed + tonumber(toks[k]) end
        if freed >= must_free then return tonumber(batch[2 * k]) + WINDOW - NOW end
      end
      start = start + 256
    end
  elseif j == 3 then return tonumber(ARGV[12]) - NOW
  elseif j == 4 then return tonumber(ARGV[13]) - NOW
  end
  return 1000000
end

local scopes, best = {}, nil
local need = {1, TOKENS, TOKENS, TOKENS, 1}
for i = 1, NSCOPES do
  local s = scope(i, 2)
  scopes[i] = s
  local u = usage(s)
  for j = 1, 5 do
    local limit = tonumber(ARGV[13 + (i - 1) * 5 + j])
    if limit >= 0 and u[j] + need[j] > limit then
      local w = wait(j, s, u[j], limit)
      if best == nil or w > best[5] then best = {i, j, limit, u[j], w} end
    end
  end
end
if best then return {'refused', best[1], best[2], best[3], best[4], best[5]} end

for i = 1, NSCOPES do
  local s = scopes[i]
  redis.call('ZADD', s.win, ARGV[1], ID)
  redis.call('HSET', s.wtok, ID, ARGV[5])
  redis.call('INCRBY', s.wsum, ARGV[5])
  redis.call('PEXPIRE', s.win, ARGV[7])
  redis.call('PEXPIRE', s.wtok, ARGV[7])
  redis.call('PEXPIRE', s.wsum, ARGV[7])
  redis.call('INCRBY', s.day, ARGV[5])
  redis.call('PEXPIRE', s.day, ARGV[9])
  redis.call('INCRBY', s.mon, ARGV[5])
  redis.call('PEXPIRE', s.mon, ARGV[10])
  redis.call('ZADD', s.fly, ARGV[6], ID)
  redis.call('PEXPIRE', s.fly, ARGV[8])
end
redis.call('HSET', KEYS[1], 'state', 'reserved', 'tokens', ARGV[5], 'at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[11])
return {'reserved'}
"""

_FINISH = _PRELUDE + """
-- KEYS[1] request record, then six keys per scope (day/month of the reservation).
-- ARGV 5 'settled' | 'released', 6 tokens actually used (settle), 7 record ttl ms.
local MODE = ARGV[5]
local held = redis.call('HMGET', KEYS[1], 'state', 'tokens')
if not held[1] then
  -- Unknown request: a release leaves a tombstone so that a reserve still on
  -- its way (e.g. a cancelled call whose script had not run yet) is a no-op.
  if MODE == 'released' then
    redis.call('HSET', KEYS[1], 'state', 'released', 'tokens', 0, 'at', ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  end
  return 0
end
if held[1] ~= 'reserved' then return 0 end
local reserved = tonumber(held[2])
local final = 0
if MODE == 'settled' then final = tonumber(ARGV[6]) end
for i = 1, NSCOPES do
  local s = scope(i, 2)
  prune(s)
  local counted = redis.call('HGET', s.wtok, ID)
  if counted then
    redis.call('HSET', s.wtok, ID, final)
    redis.call('INCRBY', s.wsum, final - tonumber(counted))
  end
  -- a counter that expired must not be re-created without a TTL
  if redis.call('EXISTS', s.day) == 1 then redis.call('INCRBY', s.day, final - reserved) end
  if redis.call('EXISTS', s.mon) == 1 then redis.call('INCRBY', s.mon, final - reserved) end
  redis.call('ZREM', s.fly, ID)
end
redis.call('HSET', KEYS[1], 'state', MODE, 'actual', final)
return 1
"""

_SNAPSHOT = _PRELUDE + """
-- KEYS: six per scope. Returns per scope the five usages and µs until the
-- oldest window entry leaves (0 when the window is empty).
local out = {}
for i = 1, NSCOPES do
  local s = scope(i, 1)
  local u = usage(s)
  local oldest = redis.call('ZRANGE', s.win, 0, 0, 'WITHSCORES')
  if oldest[2] then u[6] = tonumber(oldest[2]) + WINDOW - NOW else u[6] = 0 end
  out[i] = u
end
return out
"""


class Script:
    """A Lua script run by SHA; after a SCRIPT FLUSH or a Redis restart
    (NOSCRIPT) it is loaded again and retried once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


RESERVE = Script(_RESERVE)
FINISH = Script(_FINISH)
SNAPSHOT = Script(_SNAPSHOT)
