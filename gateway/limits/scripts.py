"""The Lua scripts that check and record usage, each one atomic step in Redis.

Two scripts: ``ADMIT`` reads a snapshot of the counters and the model's queue
depth and, in the same step, may check the limits and reserve (or refuse
``queue_full``); ``FINISH`` settles, releases or undoes a reservation. The
keys, why the layout is what it is and what each call costs in Redis
commands: docs/architecture.md, "Usage counters".
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from gateway.limits.places_lua import PLACES_LUA

#: The counters the scripts keep per scope, in the order ``usage()`` returns
#: them and the admit script reads the limits (one limit per counter, in
#: ``gateway.limits.catalogue`` order). A limit with a new counter needs a
#: field and a line in ``usage()`` and ``wait()`` here.
COUNTERS = ("requests_last_minute", "tokens_last_minute", "tokens_today", "tokens_this_month", "in_flight")

#: Keys per scope, in the order the scripts read them: the window and the
#: requests in flight (one sorted set: window entries at positive scores,
#: in-flight slots at negative ones), the counters (hash).
SCOPE_KEYS = ("win", "h")

# Lua quirks this code respects: numbers concatenated into strings are
# formatted with %.14g (so µs timestamps would lose digits: they travel as
# the ARGV strings they came in; numbers passed to redis.call are formatted
# with %.17g and stay exact); a Lua number returned to Redis becomes an
# integer (fractions are truncated); a missing value from GET/HMGET is
# `false`, not nil.

_PRELUDE = """
local NOW = tonumber(ARGV[1])
local WINDOW = tonumber(ARGV[2])
local NSCOPES = tonumber(ARGV[3])
local ID = ARGV[4]
local WID = 'w:' .. ID
-- A request's in-flight slot: a member of the window's sorted set, at minus its
-- expiry, so that window entries (scores > 0: their time) and slots (< 0) are
-- read apart by score. Its name cannot be a window entry's: request ids never
-- begin with a NUL (gateway.limits.counters refuses them).
local FID = '\0' .. ID
-- The request's record ('state tokens time(µs)', and a reserved one's wait and team: RECORD): a
-- field of the first scope's (the principal's) counters hash, read and written with its counters (no
-- command of its own), deleted with its window entry once the request has ended; KEYS[1], a key of its
-- own, holds a tombstone (a release of a request never reserved) or a record an older gateway wrote.
local RID = 'r:' .. ID

-- The two keys of scope i (they follow the request record, KEYS[1]).
local function scope(i)
  local b = 2 + (i - 1) * 2
  return {win = KEYS[b], h = KEYS[b + 1]}
end

-- The counters hash: n and s (requests and tokens in the window), w:<id> (a
-- request's tokens while it is in the window), D/d today's label and tokens,
-- PD/pd the day before's, M/m and PM/pm the same for months, f the in-flight
-- slots stored (in the window's set) and fx no later than the earliest of
-- their expiries (so while fx > NOW none has expired and f is the count).
local PERIOD = {'D', 'd', 'PD', 'pd', 'M', 'm', 'PM', 'pm'}

-- Add `delta` tokens to the day and month a request was charged to, if
-- their counters are still kept (a period that is gone stays gone).
local function charge(out, v, day, month, delta)
  if v.D == day then out[#out + 1] = 'd'; out[#out + 1] = tonumber(v.d) + delta
  elseif v.PD == day then out[#out + 1] = 'pd'; out[#out + 1] = tonumber(v.pd) + delta end
  if v.M == month then out[#out + 1] = 'm'; out[#out + 1] = tonumber(v.m) + delta
  elseif v.PM == month then out[#out + 1] = 'pm'; out[#out + 1] = tonumber(v.pm) + delta end
end

-- HMGET of `fields` as a table keyed by field name.
local function hget(key, fields)
  local got = redis.call('HMGET', key, unpack(fields))
  local v = {}
  for k, f in ipairs(fields) do v[f] = got[k] end
  return v
end

-- The fields finish() reads, and with `record` the request's record too.
local function finish_fields(record)
  local fields = {'n', 's', 'f', WID, unpack(PERIOD)}
  if record then fields[#fields + 1] = RID end
  return fields
end

-- The request `ID` is done with in scope s: its window tokens become `final`
-- (or, `undo`, it leaves the window as if never made), its day and month are
-- charged `final - reserved`, its in-flight slot is freed. `v`: the hash's
-- fields (finish_fields) if read already; `rec`: for the scope whose hash
-- holds the record, its new value, kept beside the window entry (the prune
-- deletes both) or deleted now when the entry is gone or undone.
local function finish(s, undo, reserved, final, day, month, v, rec)
  v = v or hget(s.h, finish_fields(false))
  local out, drop = {}, {}
  local freed
  if v[WID] and undo then
    -- the window entry goes too (it is stored while its w: field is)
    freed = math.max(0, redis.call('ZREM', s.win, ID, FID) - 1)
  else
    freed = redis.call('ZREM', s.win, FID)
  end
  if v[WID] then
    if undo then
      drop[#drop + 1] = WID
      out = {'n', tonumber(v.n) - 1, 's', tonumber(v.s) - tonumber(v[WID])}
    else
      out = {'s', tonumber(v.s) + final - tonumber(v[WID]), WID, final}
    end
  end
  if rec then
    if v[WID] and not undo then out[#out + 1] = RID; out[#out + 1] = rec else drop[#drop + 1] = RID end
  end
  if #drop > 0 then redis.call('HDEL', s.h, unpack(drop)) end
  charge(out, v, day, month, final - reserved)
  if v.f and freed > 0 then out[#out + 1] = 'f'; out[#out + 1] = tonumber(v.f) - freed end
  if #out > 0 then redis.call('HSET', s.h, unpack(out)) end
end
"""

_ADMIT = _PRELUDE + PLACES_LUA + """
-- KEYS: [1] request record, two per scope, then (maybe none) the model's queue: its admitting hash
-- (gateway/limits/admitting.py), then its lists (fifo), or (fair) its waiting hash, the shares hash, its
-- tags hash and the live workers' set.
-- ARGV 5 'snapshot' | 'reserve', 6 tokens, 7 in-flight expiry (µs), 8 key ttl (ms), 9 record ttl (ms),
-- 10 day end (µs), 11 month end (µs), 12 today, 13 yesterday, 14 this month, 15 last month,
-- 16 queue limit (-1: none), 17 '1': replace a reservation this request holds (18, 19: its day and month),
-- 20 'fair' (the queue keys are fair share's) or '', 21 the team's field in the waiting hash,
-- 22 the model's members' prefix in the live workers' set, 23 until when (µs) an admitted request holds
-- its place in the admitting hash ('': it takes none, an early reservation), 24 how long (s) its gateway
-- may take to record an admitted request ('-': not said), 25.. five limits per scope (-1: none).
-- The queue's depth counts the admitting hash's live places with the queue's jobs: a request admitted
-- after its decision but not yet queued holds its place (its team's, in fair mode) from its reservation on.
-- An early reservation is made before the policy decides (gateway/requests/admission.py): it is checked
-- against the queue (a full one refuses it) but takes no place, so a request the policy then denies never
-- held one; its push checks again and takes the place in the same step (gateway/limits/places_lua.py).
-- Returns {usage per scope (five counters and µs until the oldest window entry leaves),
--          queue depth (-1: not read), outcome...}; outcome is {'snapshot'}, {'reserved'},
-- {'held', state, tokens, at}, {'refused', scope, limit, value, used, wait µs}, {'queue_full', depth}
-- or (fair) {'queue_full', depth, team waiting, team cap, weight, waiting teams' weight, svc, live workers,
-- 1 if the ceiling refused}.
local MODE = ARGV[5]
local TOKENS = tonumber(ARGV[6])
local CUTOFF = NOW - WINDOW
-- A request's record says how long its gateway may take to record it (ARGV[24]) and names its team when
-- it has one (the team's keys' escaped name: KEYS[4] is '<tag>:t:<name>:win', gateway/limits/counters.py),
-- so that any gateway can tell when a reservation whose gateway died before recording the request is
-- stale, and end it in both scopes (gateway/requests/stale_reservations.py).
local RECORD = 'reserved ' .. ARGV[6] .. ' ' .. ARGV[1] .. ' ' .. (ARGV[24] or '-')
if NSCOPES == 2 then
  local team = string.match(KEYS[4], ':t:([^:]+):win$')
  if team then RECORD = RECORD .. ' ' .. team end
end
local FIRST = 8  -- window entries read at once: the oldest in-window one and what left since the last call
local LAZY = 4   -- fewer entries than this that left the window are counted out but deleted later, together

-- A reservation's first write must be one Redis refuses when it is out of
-- memory (ZADD, HSET: "denyoom"), or Redis lets every later write of the
-- script through: so in 'reserve' mode the pruning deletions (HDEL, ZREM,
-- ZREMRANGEBYSCORE) are queued here and run once the call's own writes
-- are done (until 2026-12-02 the record's SET NX came first).
local LATER = {}
local function delete(...)
  if MODE == 'reserve' then LATER[#LATER + 1] = {...} else redis.call(...) end
end
local function deleted()
  for _, c in ipairs(LATER) do redis.call(unpack(c)) end
  LATER = {}
end

-- Scope s's requests in flight. The count kept in the hash answers while no
-- entry can have expired (fx > NOW); otherwise (a gateway died holding slots,
-- or just fx is stale: about once per in-flight expiry) the expired entries
-- are dropped and the rest counted, fx read again, and the hash (if it
-- exists: `known`) gets both at its next write.
local function in_flight(s, known)
  if s.f and (s.f == 0 or (s.fx and s.fx > NOW)) then return s.f end
  delete('ZREMRANGEBYSCORE', s.win, '-' .. ARGV[1], '(0')
  s.recounted = true
  local last = redis.call('ZRANGE', s.win, '(-' .. ARGV[1], '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1, 'WITHSCORES')
  s.f, s.fx = 0, nil
  if last[2] then s.f, s.fx = redis.call('ZCOUNT', s.win, '-inf', '(-' .. ARGV[1]), -tonumber(last[2]) end
  if known then s.dirty = true end
  return s.f
end

-- The hash's window counters and in-flight count, after a call that changed
-- them without recording a request.
local function flush(s)
  if s.dirty then redis.call('HSET', s.h, 'n', s.n, 's', s.s, 'f', s.f, 'fx', s.fx or 0) end
end

-- The records of ended requests whose window entries are gone, in the hash
-- that holds the records: an older gateway (before 2026-12-02) prunes the
-- window entries (w: fields) without the records beside them, which then
-- stayed until the hash expired. Looked for when a month begins on a hash
-- that was there before: one HGETALL a month, no cost per request (so such
-- records stay until the month ends). One with a w: field is pruned with
-- it; one still reserved is its request's (its end deletes it) unless it is
-- older than a record's TTL (ARGV[9]: an older gateway's own key expired
-- then; its gateway died and nobody settled it, as when a name was dropped).
local function drop_strays(s)
  local all = redis.call('HGETALL', s.h)
  local has, drop = {}, {}
  local expired = NOW - tonumber(ARGV[9]) * 1000
  for i = 1, #all, 2 do has[all[i]] = all[i + 1] end
  for f, v in pairs(has) do
    if string.sub(f, 1, 2) == 'r:' and not has['w:' .. string.sub(f, 3)] then
      local at = tonumber(string.match(v, '^reserved %S+ (%d+)'))
      if not string.find(v, '^reserved ') or (at and at < expired) then drop[#drop + 1] = f end
    end
  end
  for i = 1, #drop, 1000 do redis.call('HDEL', s.h, unpack(drop, i, math.min(i + 999, #drop))) end
end

-- The fields to delete of entries that left the window (`gone`: their w:
-- fields): their tokens, and in the hash that holds the records the records
-- of requests that ended (one still reserved is kept: its end deletes it).
local function leaving(s, gone, got)
  local drop = {unpack(gone)}
  if s.records then
    for _, f in ipairs(gone) do
      local r = 'r:' .. string.sub(f, 3)
      if not string.find(got[r] or '', '^reserved ') then drop[#drop + 1] = r end
    end
  end
  return drop
end

-- HMGET of the leaving entries' fields (tokens, and records where kept) as a table.
local function read_leaving(s, gone)
  local fields = {unpack(gone)}
  if s.records then for _, f in ipairs(gone) do fields[#fields + 1] = 'r:' .. string.sub(f, 3) end end
  if #fields == 0 then return {} end
  return hget(s.h, fields)
end

-- Prune scope s's window (entries at or before NOW - WINDOW leave with their
-- tokens) and read its counters into s (with `s.records`, also this request's
-- record and `T`, until when a tombstone may be kept in KEYS[1]).
local function load(s)
  s.lag, s.lagged = 0, 0  -- entries that left the window but are still stored, and their tokens
  s.queued = 0  -- entries that left the window whose deletion is queued (still stored until the end)
  local head = redis.call('ZRANGE', s.win, '(0', '+inf', 'BYSCORE', 'LIMIT', 0, FIRST, 'WITHSCORES')
  local gone = {}
  for k = 1, #head, 2 do
    if tonumber(head[k + 1]) <= CUTOFF then gone[#gone + 1] = 'w:' .. head[k]
    elseif not s.oldest then s.oldest = tonumber(head[k + 1]) end
  end
  local fields = {'n', 's', 'f', 'fx', unpack(PERIOD)}
  if s.records then fields[#fields + 1] = RID; fields[#fields + 1] = 'T' end
  for _, f in ipairs(gone) do fields[#fields + 1] = f end  -- the leaving entries' tokens too
  if s.records then for _, f in ipairs(gone) do fields[#fields + 1] = 'r:' .. string.sub(f, 3) end end
  local v = hget(s.h, fields)
  s.record, s.T = v[RID], tonumber(v.T)
  for _, f in ipairs(PERIOD) do s[f] = v[f] end
  s.f, s.fx = tonumber(v.f), tonumber(v.fx)
  if not v.n then
    -- no counters hash (never written, or expired): nothing in the window is known
    if #head > 0 then redis.call('ZREMRANGEBYSCORE', s.win, '(0', '+inf') end
    s.n, s.s, s.oldest = 0, 0, nil
  else
    s.n, s.s = tonumber(v.n), tonumber(v.s)
    local size, toks = FIRST, {}
    for k, f in ipairs(gone) do toks[k] = v[f] end
    if #gone > 0 and #gone < LAZY and s.oldest then
      -- A few left (and the head shows where the window begins): they are
      -- counted out of n and s here, but stay stored until more have left,
      -- so that steady traffic pays the two deletions once per LAZY calls.
      s.lag = #gone
      for k = 1, #gone do
        if toks[k] then s.lagged = s.lagged + tonumber(toks[k]) end
      end
      gone = {}
    end
    while #gone > 0 do
      for k = 1, #gone do
        if toks[k] then s.s = s.s - tonumber(toks[k]) end
      end
      delete('HDEL', s.h, unpack(leaving(s, gone, v)))
      local members = {}
      for k, f in ipairs(gone) do members[k] = string.sub(f, 3) end
      delete('ZREM', s.win, unpack(members))
      if MODE == 'reserve' then s.queued = s.queued + #gone end
      s.n, s.dirty = s.n - #gone, true
      if s.oldest or #gone < size then break end
      -- all of the head had left: read on until the window's first entry
      gone, size = {}, 256
      local batch = redis.call('ZRANGE', s.win, '(0', '+inf', 'BYSCORE', 'LIMIT', s.queued, 256, 'WITHSCORES')
      for k = 1, #batch, 2 do
        if tonumber(batch[k + 1]) <= CUTOFF then gone[#gone + 1] = 'w:' .. batch[k]
        elseif not s.oldest then s.oldest = tonumber(batch[k + 1]) end
      end
      if #gone > 0 then
        v = read_leaving(s, gone)
        for k, f in ipairs(gone) do toks[k] = v[f] end
      end
    end
  end
  -- (the day before's counter answers a caller whose clock is behind the last writer's)
  s.today = (s.D == ARGV[12] and tonumber(s.d)) or (s.PD == ARGV[12] and tonumber(s.pd)) or 0
  s.month = (s.M == ARGV[14] and tonumber(s.m)) or (s.PM == ARGV[14] and tonumber(s.pm)) or 0
  s.flying = in_flight(s, v.n)
  s.usage = {s.n - s.lag, s.s - s.lagged, s.today, s.month, s.flying}
end

-- Microseconds until limit j of scope s admits the request, given it fails now.
local function wait(j, s, used, limit)
  if j == 1 then
    -- the (used + 1 - limit)-th oldest request in the window has to leave it
    local rank = s.queued + s.lag + used - limit
    local entry = redis.call('ZRANGE', s.win, '(0', '+inf', 'BYSCORE', 'LIMIT', rank, 1, 'WITHSCORES')
    if entry[2] then return tonumber(entry[2]) + WINDOW - NOW end
    return WINDOW
  elseif j == 2 then
    if TOKENS > limit then return WINDOW end
    local must_free, freed, start = used + TOKENS - limit, 0, s.queued + s.lag
    while true do
      local batch = redis.call('ZRANGE', s.win, '(0', '+inf', 'BYSCORE', 'LIMIT', start, 256, 'WITHSCORES')
      if #batch == 0 then return WINDOW end
      local ids = {}
      for k = 1, #batch, 2 do ids[#ids + 1] = 'w:' .. batch[k] end
      local toks = redis.call('HMGET', s.h, unpack(ids))
      for k = 1, #ids do
        if toks[k] then freed = freed + tonumber(toks[k]) end
        if freed >= must_free then return tonumber(batch[2 * k]) + WINDOW - NOW end
      end
      start = start + 256
    end
  elseif j == 3 then return tonumber(ARGV[10]) - NOW
  elseif j == 4 then return tonumber(ARGV[11]) - NOW
  end
  return 1000000
end

-- Charge TOKENS to the period `label` (the one before it: `before`); L/l
-- are the fields of the current period's label and count, PL/pl the
-- previous one's. Returns true when this write begins a new period.
local function advance(out, s, L, l, PL, pl, label, before)
  local function put(...) for _, x in ipairs({...}) do out[#out + 1] = x end end
  if s[L] == label then put(l, tonumber(s[l]) + TOKENS); return false end
  if s[L] and label < s[L] then
    -- a replica whose clock is behind the last writer's, around midnight
    if s[PL] == label then put(pl, tonumber(s[pl]) + TOKENS) end
    return false
  end
  local keep = s[L] == before
  put(PL, keep and s[L] or '', pl, keep and s[l] or 0, L, label, l, TOKENS)
  return true
end

-- Record the request in scope s: one request and TOKENS tokens in the window,
-- today and this month, one in flight. Keys get their TTL when they are
-- created and when a month begins, not on every write (an active scope's
-- keys are renewed at least monthly; the TTL outlasts a month).
local function add(s)
  local out = {'n', s.n + 1, 's', s.s + TOKENS, WID, TOKENS}
  if s.records then out[#out + 1] = RID; out[#out + 1] = RECORD end
  advance(out, s, 'D', 'd', 'PD', 'pd', ARGV[12], ARGV[13])
  local new_month = advance(out, s, 'M', 'm', 'PM', 'pm', ARGV[14], ARGV[15])
  local renew = new_month or s.n == 0
  -- the window entry and the in-flight slot, in one command (the call's first write: see LATER); both
  -- are new but for odd histories of a reused request id, where the next call counts again
  local added = redis.call('ZADD', s.win, ARGV[1], ID, '-' .. ARGV[7], FID)
  -- (entries left by a gateway that died are dropped when the keys are renewed; a recount dropped
  -- and counted them already)
  if renew and not s.recounted then s.f = s.f - redis.call('ZREMRANGEBYSCORE', s.win, '-' .. ARGV[1], '(0') end
  if new_month and s.M and s.records then drop_strays(s) end  -- (a hash from before: s.M)
  local expiry = tonumber(ARGV[7])
  local fx = expiry
  if s.f > 0 and s.fx and s.fx < expiry then fx = s.fx end
  if added ~= 2 then fx = 0 end
  out[#out + 1] = 'f'; out[#out + 1] = s.f + 1
  out[#out + 1] = 'fx'; out[#out + 1] = fx
  redis.call('HSET', s.h, unpack(out))
  if renew then
    -- The hash or the window was created (an emptied sorted set is deleted,
    -- and then its window was empty): both get the scope's lifetime.
    redis.call('PEXPIRE', s.h, ARGV[8])
    redis.call('PEXPIRE', s.win, ARGV[8])
  end
end

-- The queue's keys: the admitting hash at QFIRST, the lists or fair share's keys after it.
local QFIRST = 2 + 2 * NSCOPES
local QUEUE = #KEYS >= QFIRST

-- The places held by requests admitted but not yet queued (gateway/limits/places_lua.py): the expired
-- ones are deleted with the call's other deletions.
local function holding()
  local total, teams, own, expired = places_held(KEYS[QFIRST], ID, NOW)
  if #expired > 0 then delete('HDEL', KEYS[QFIRST], unpack(expired)) end
  return total, teams, own
end

local FAIR = ARGV[20] == 'fair'
local TEAM = ARGV[21]
local function fair_check(limit, total, mine, others)
  return fair_refusal({limit = limit, team = TEAM, shares = KEYS[QFIRST + 2], tags = KEYS[QFIRST + 3],
                       workers = KEYS[QFIRST + 4], prefix = ARGV[22], now = NOW}, total, mine, others)
end

local function reply(scopes, waiting, outcome)
  local out = {}
  for i = 1, NSCOPES do
    local s = scopes[i]
    local u = {unpack(s.usage)}
    u[6] = s.oldest and (s.oldest + WINDOW - NOW) or 0
    out[i] = u
  end
  out[NSCOPES + 1] = waiting
  out[NSCOPES + 2] = outcome
  return out
end

-- The request's record (read with the first scope's counters; written with
-- them when the request is admitted, nothing written when it is refused): a
-- request that has one already is answered from it. A replacement gives back
-- the reservation the record holds first.
local held = nil
if MODE == 'reserve' and ARGV[17] == '1' then
  local s1 = scope(1)
  local v1 = hget(s1.h, finish_fields(true))
  local rec, own = v1[RID], true
  if not rec then rec, own = redis.call('GET', KEYS[1]), false end
  local state, tokens = string.match(rec or '', '^(%S+) (%S+)')
  if state == 'reserved' then
    for i = 1, NSCOPES do
      finish(scope(i), true, tonumber(tokens), 0, ARGV[18], ARGV[19], i == 1 and v1 or nil, i == 1 and own and rec)
    end
    if not own then redis.call('DEL', KEYS[1]) end
  else
    held = rec or nil
  end
end

local scopes = {}
for i = 1, NSCOPES do
  scopes[i] = scope(i)
  scopes[i].records = i == 1
  load(scopes[i])
end
if MODE == 'reserve' and ARGV[17] ~= '1' then
  held = scopes[1].record or nil
  -- a tombstone (or an older gateway's record) in the record's own key, looked for only while one
  -- may be there
  if not held and scopes[1].T and scopes[1].T > NOW then held = redis.call('GET', KEYS[1]) or nil end
end
local waiting, mine, others = -1, nil, nil
local holds, hold_teams, own_hold = 0, {}, false
if QUEUE then
  holds, hold_teams, own_hold = holding()
  if FAIR then waiting, mine, others = fair_places(KEYS[QFIRST + 1], hold_teams, TEAM)
  else waiting = lists_depth(QFIRST + 1) + holds end
end

if MODE ~= 'reserve' then
  for i = 1, NSCOPES do
    local s = scopes[i]
    flush(s)
  end
  return reply(scopes, waiting, {'snapshot'})
end
if held then
  local state, tokens, at = string.match(held, '^(%S+) (%S+) (%S+)')  -- (then its wait and maybe its team)
  for i = 1, NSCOPES do
    local s = scopes[i]
    flush(s)
  end
  deleted()
  return reply(scopes, waiting, {'held', state, tokens, at})
end

local best = nil
local need = {1, TOKENS, TOKENS, TOKENS, 1}
for i = 1, NSCOPES do
  local s = scopes[i]
  for j = 1, 5 do
    local limit = tonumber(ARGV[24 + (i - 1) * 5 + j])
    if limit >= 0 and s.usage[j] + need[j] > limit then
      local w = wait(j, s, s.usage[j], limit)
      if best == nil or w > best[5] then best = {i, j, limit, s.usage[j], w} end
    end
  end
end
local outcome
local limit = tonumber(ARGV[16])
if best then
  outcome = {'refused', best[1], best[2], best[3], best[4], best[5]}
elseif limit >= 0 and FAIR then
  outcome = fair_check(limit, waiting, mine, others)
elseif limit >= 0 and waiting >= limit then
  outcome = {'queue_full', waiting}
end
if outcome then
  for i = 1, NSCOPES do
    local s = scopes[i]
    flush(s)
  end
  -- a place this request held (a replacement's, whose reservation was given back above) goes with it
  if own_hold then delete('HDEL', KEYS[QFIRST], ID) end
  deleted()
  return reply(scopes, waiting, outcome)
end
for i = 1, NSCOPES do add(scopes[i]) end
-- its place, until it is queued (the push deletes it) or gives its reservation back (FINISH does); an early
-- reservation (ARGV[23] ''), made before the policy decided, takes none: its push checks and takes it
if QUEUE and limit >= 0 and ARGV[23] ~= '' then redis.call('HSET', KEYS[QFIRST], ID, TEAM .. ' ' .. ARGV[23]) end
deleted()
return reply(scopes, waiting, {'reserved'})
"""

_FINISH = _PRELUDE + """
-- KEYS[1] request record, then two keys per scope, then (maybe) the model's admitting hash.
-- ARGV 5 'settled' | 'released' | 'undone', 6 tokens actually used (settle), 7 a tombstone's ttl (ms),
-- 8 the reservation's day, 9 its month, 10 its tokens, 11 its time (µs), 12 '1': leave a tombstone
-- whatever the record holds (a give-back after an admit call that failed: gateway/limits/counters.py).
local MODE = ARGV[5]
-- A request that gives its reservation back before it was queued gives back its place in the queue
-- too (gateway/limits/admitting.py); one queued has none left (its push deleted it), and the field is
-- then simply absent. Done whatever the record says: a give-back of a reserve whose script runs later
-- leaves a tombstone, and that script then reserves nothing and holds no place.
if #KEYS >= 2 + 2 * NSCOPES then redis.call('HDEL', KEYS[2 + 2 * NSCOPES], ID) end
-- The record is read with the first scope's counters and marked with them.
local s1 = scope(1)
local v1 = hget(s1.h, finish_fields(true))

-- A tombstone in the record's own key: a reserve still on its way (a cancelled or failed call whose
-- script had not run yet) finds it and is a no-op. T tells the admit script until when to look for
-- one; it is only ever moved later (tombstones live the record's ttl, or a give-back's shorter one).
local function tombstone()
  redis.call('SET', KEYS[1], 'released 0 ' .. ARGV[1], 'PX', ARGV[7])
  local until_ = NOW + tonumber(ARGV[7]) * 1000
  local T = tonumber(redis.call('HGET', s1.h, 'T'))
  if not T or T < until_ then redis.call('HSET', s1.h, 'T', until_) end
  if redis.call('PTTL', s1.h) < 0 then redis.call('PEXPIRE', s1.h, ARGV[7]) end
end

local held, own = v1[RID], true
if not held then
  -- not in the hash: a record an older gateway wrote in its own key, or none
  held, own = redis.call('GET', KEYS[1]), false
  if not held then
    -- Unknown request: a release leaves a tombstone
    if MODE ~= 'settled' then tombstone() end
    return 0
  end
end
local state, tokens = string.match(held, '^(%S+) (%S+)')
if state ~= 'reserved' then return 0 end  -- settled or released already: as it was
local rec = MODE .. ' ' .. ARGV[10] .. ' ' .. ARGV[11]
if not own then redis.call('SET', KEYS[1], rec, 'KEEPTTL') end
local final = 0
if MODE == 'settled' then final = tonumber(ARGV[6]) end
for i = 1, NSCOPES do
  finish(scope(i), MODE == 'undone', tonumber(tokens), final, ARGV[8], ARGV[9], i == 1 and v1 or nil,
         i == 1 and own and rec)
end
-- (a failed replacement's script may still come, and a replacement reads the record's own key)
if ARGV[12] == '1' then tombstone() end
return 1
"""


class Script:
    """A Lua script run by SHA; after a SCRIPT FLUSH or a Redis restart
    (NOSCRIPT) it is loaded again and retried once.

    The SHA is computed here once, so the common call is one ``EVALSHA``
    that sends no source (redis-py's own ``Script`` object would do the
    same, but it may not be shared across clients of different pools).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


ADMIT = Script(_ADMIT)
FINISH = Script(_FINISH)
