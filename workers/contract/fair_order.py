"""The workers' fair-share order: one Lua script that charges the job just taken and orders a model's lists.

A worker takes a job with BRPOP over a model's lists, and BRPOP pops from the
first non-empty list in the order it is given. :data:`PICK` returns that order:
the team furthest below its share first, inside it priority 0 to 9, inside a
priority the principal furthest below its share first, then the model's wake
list. The measure is start-time fair queueing (Goyal et al., 1996) over
Redis hashes (``workers/contract/fair_queues.py``): serving a job of team
``t`` starts at ``S = max(V, F_t)``, moves the team's finish tag to
``F_t = S + est / w_t`` and the virtual time to ``V = S``; teams are ordered
by ``max(V, F_t)`` (their next start). A team that was idle starts at ``V``,
so waiting builds no credit, and a backlogged team of weight 3 is served
three times for every job of one of weight 1. Inside a team the same rule
runs over principals with equal weights (``v:<team>``, ``p:<team>/<principal>``).

``est`` is ``svc``, the running mean service time of the model (ms); each
later call brings the real service time of jobs acknowledged since (measured
by the worker's main process from delivery to acknowledgement), and the tags
are corrected by the difference, so a team of long jobs pays for them.

The script is given the fixed keys; the lists themselves come from the
registry (Celery's lists live on one Redis, not a Cluster, as before).
It lives in ``workers.contract`` because the worker's main process (the
transport, :mod:`workers.contract.kombu_redis`) runs it, and tests drive it
directly. See docs/architecture.md, "Fair share".
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import redis
from redis.exceptions import NoScriptError

from workers.contract.fair_queues import SHARES_KEY, registry_key, tags_key, waiting_key, wake_key

#: Service time (ms) charged before the model's mean is known; corrected once the job is acknowledged.
DEFAULT_ESTIMATE_MS = 1000.0
#: A registered list that has been empty and not pushed to for this long leaves the registry. Losing
#: nothing: a push re-registers a list it does not find (``gateway/dispatch/fair_push.py``), and a tag
#: is dropped only when behind its virtual time. Short, because each pick's cost grows with the
#: registered lists (about 10 us a list on the test machine's Redis; docs/architecture.md, "Fair share").
PRUNE_AFTER_S = 300.0
#: How often (at most) a pick recounts the waiting jobs from the lists and prunes the registry.
RECOUNT_EVERY_S = 1.0
#: Weight of one new service time in the running mean ``svc``.
SVC_ALPHA = 0.2
#: A new service time enters the running mean at most this many times the mean (one odd job does not
#: make every later charge wrong; the team's tags still get the time it really took).
SVC_CLAMP = 4.0
#: A correction's service time for a job that was not measured (a pool process's warm-up): the job is
#: charged the model's mean (``svc``), or nothing while that is unknown, and the mean is left alone.
NOT_MEASURED = -1.0

#: The fair-share state of one model as Lua functions over a table ``m`` (its keys, members, tags, weights):
#: shared by :data:`_PICK` (below) and the worker's take (``workers/contract/take.py``), which order a
#: model's lists the same way.
LIB = f"""
local parsed = {{}}
local function parts(key)
  local p = parsed[key]
  if not p then
    local base, pri = string.match(key, '^(.*):(%d)$')
    if not base then base, pri = key, '0' end
    local team, principal = string.match(base, '^model%.[^/]+/([^/]+)/([^/]+)$')
    -- the principal's tag field, built once per list and call (the pick read and sorted by it twice)
    p = {{team, principal, base, tonumber(pri), team and ('p:' .. team .. '/' .. principal)}}
    parsed[key] = p
  end
  return p[1], p[2], p[3], p[4], p[5]
end

local function chunked(command, key, items)
  local out = {{}}
  for i = 1, #items, 1000 do
    local part = redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
    if type(part) == 'table' then for _, v in ipairs(part) do out[#out + 1] = v end end
  end
  return out
end

-- weights: the shares hash as a table, once per call when a team's weight is first needed: from the
-- copy in the tags hash ('W', JSON, read with the tags), which the recount renews from the shares hash
-- at most once a second (and a call that finds no copy makes)
local weights = nil
local function fresh_weights(m)
  weights = {{}}
  local raw = redis.call('HGETALL', m.SHARES)
  for i = 1, #raw, 2 do weights[raw[i]] = tonumber(raw[i + 1]) end
  local copy = cjson.encode(weights)
  if copy ~= m.W then m.W = copy; m.tag['W'] = copy; m.dirty['W'] = true end
  return weights
end
local function read_weights(m)
  if not weights then
    local ok, copy = pcall(cjson.decode, m.W or '')
    if ok and type(copy) == 'table' then weights = copy else return fresh_weights(m) end
  end
  return weights
end

-- one model's state: its registered lists and every tag this call may read (those of the registered
-- lists and of ``extra``: a list just popped, the corrected ones); ``all``: the whole tags hash, read
-- already (HGETALL, flat), whose 'L' gave ``members``, so none is read here
local function load(REG, TAGS, WAIT, WAKE, SHARES, extra, members, all)
  local m = {{REG = REG, TAGS = TAGS, WAIT = WAIT, WAKE = WAKE, SHARES = SHARES, dirty = {{}}, tag = {{}}}}
  m.members = members or redis.call('ZRANGE', REG, 0, -1)
  m.live = m.members
  if all then
    for i = 1, #all, 2 do m.tag[all[i]] = tonumber(all[i + 1]) end
    for i = 1, #all, 2 do if all[i] == 'W' then m.W = all[i + 1] end end
    m.tag['W'], m.tag['L'] = nil, nil
    return m
  end
  -- 'plain': set while the model's plain lists may hold a job (workers/contract/take.py)
  local fields, seen, seen_team = {{'V', 'svc', 'rc', 'plain', 'W'}}, {{}}, {{}}
  local function want(f) if not seen[f] then seen[f] = true; fields[#fields + 1] = f end end
  local function want_list(key)
    local team, _, _, _, pf = parts(key)
    if team then
      if not seen_team[team] then
        seen_team[team] = true
        fields[#fields + 1] = 't:' .. team; fields[#fields + 1] = 'v:' .. team
      end
      want(pf)
    end
  end
  for _, key in ipairs(m.members) do want_list(key) end
  for _, key in ipairs(extra) do if key ~= '' then want_list(key) end end
  local values = chunked('HMGET', TAGS, fields)
  for i, f in ipairs(fields) do m.tag[f] = tonumber(values[i]) end
  m.W = values[5] or nil  -- the shares' copy, a string
  m.tag['W'] = nil
  return m
end
local function get(m, f) return m.tag[f] or 0 end
local function set(m, f, v) m.tag[f] = v; m.dirty[f] = true end
-- 'L', the registry's members as a JSON array in the tags hash (workers/contract/take.py)
local function set_list(m, members) set(m, 'L', cjson.encode(members)) end

-- a team's weight: as encoded, or decoded, else '*', else 1
local function positive(x) if x and x > 0 then return x end end
local function w(m, team)
  local weight = read_weights(m)
  local x = positive(weight[team])
  if not x then
    local decoded = string.gsub(team, '%%(%x%x)', function(h) return string.char(tonumber(h, 16)) end)
    x = positive(weight[decoded])
  end
  return x or positive(weight['*']) or 1
end

-- (b) a correction: the real service time of a job acknowledged since the last call
local function correct(m, list, actual, charged)
  local team, principal = parts(list)
  if team and actual and charged then
    local svc = m.tag['svc']
    local measured = actual >= 0
    if not measured then actual = svc or 0 end
    local diff = actual - charged
    set(m, 'cs', get(m, 'cs') + 1)  -- the tags changed: a start's undo of an earlier charge is off
    set(m, 't:' .. team, get(m, 't:' .. team) + diff / w(m, team))
    set(m, 'p:' .. team .. '/' .. principal, get(m, 'p:' .. team .. '/' .. principal) + diff)
    if measured then
      if svc then set(m, 'svc', svc + {SVC_ALPHA} * (math.min(actual, {SVC_CLAMP} * svc) - svc))
      else set(m, 'svc', actual) end
    end
  end
end

-- (a) charge the list just popped: '' if nothing was charged, else the ms charged
local function charge(m, popped, default_est)
  local team, principal = parts(popped)
  if not team then return '' end
  local est = m.tag['svc'] or default_est
  local V = get(m, 'V')
  local start = math.max(V, get(m, 't:' .. team))
  set(m, 't:' .. team, start + est / w(m, team))
  set(m, 'V', start)
  local pf = 'p:' .. team .. '/' .. principal
  local pstart = math.max(get(m, 'v:' .. team), get(m, pf))
  set(m, pf, pstart + est)
  set(m, 'v:' .. team, pstart)
  if redis.call('HINCRBY', m.WAIT, team, -1) <= 0 then redis.call('HDEL', m.WAIT, team) end
  return tostring(est)
end

-- recount and prune, at most once every {RECOUNT_EVERY_S} s; true if it ran
local function recount(m, now)
  if now - get(m, 'rc') < {RECOUNT_EVERY_S} then return false end
  set(m, 'rc', now)
  fresh_weights(m)  -- a policy's new shares reach the order within a second
  local live, counts, gone, idle = {{}}, {{}}, {{}}, {{}}
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', m.REG, '-inf', '(' .. (now - {PRUNE_AFTER_S}))) do idle[key] = true end
  for _, key in ipairs(m.members) do
    local n = redis.call('LLEN', key)
    local team, principal = parts(key)
    if n == 0 and idle[key] then
      gone[#gone + 1] = key
      if team then
        local pf = 'p:' .. team .. '/' .. principal
        -- a tag at or behind its virtual time says nothing max() would not: dropping it loses nothing
        if m.tag[pf] and m.tag[pf] <= get(m, 'v:' .. team) then redis.call('HDEL', m.TAGS, pf); m.tag[pf] = nil; m.dirty[pf] = nil end
        local tf = 't:' .. team
        if m.tag[tf] and m.tag[tf] <= get(m, 'V') then redis.call('HDEL', m.TAGS, tf); m.tag[tf] = nil; m.dirty[tf] = nil end
      end
    else
      live[#live + 1] = key
      if team then counts[team] = (counts[team] or 0) + n end
    end
  end
  m.live = live
  if #gone > 0 then chunked('ZREM', m.REG, gone) end
  if m.listed then set_list(m, live) end
  redis.call('DEL', m.WAIT)
  local flat = {{}}
  for team, n in pairs(counts) do
    if n > 0 then flat[#flat + 1] = team; flat[#flat + 1] = n end
  end
  if #flat > 0 then chunked('HSET', m.WAIT, flat) end
  return true
end

-- the tags this call changed, written back
local function write(m)
  local changed = {{}}
  for f, _ in pairs(m.dirty) do changed[#changed + 1] = f; changed[#changed + 1] = tostring(m.tag[f]) end
  if #changed > 0 then chunked('HSET', m.TAGS, changed) end
  m.dirty = {{}}
end

-- (c) the order of the live lists: teams by (next start, finish tag, name), priority 0..9, principals likewise
local function order(m)
  local V = get(m, 'V')
  local teams, by_team = {{}}, {{}}
  for _, key in ipairs(m.live) do
    local team, principal, _, pri, pf = parts(key)
    if team then
      local t = by_team[team]
      if not t then
        -- pris: the priorities its lists have (has: as a set); pf: each principal's tag field
        t = {{principals = {{}}, lists = {{}}, pris = {{}}, has = {{}}, pf = {{}}}}
        by_team[team] = t; teams[#teams + 1] = team
      end
      if not t.lists[principal] then
        t.lists[principal] = {{}}; t.principals[#t.principals + 1] = principal; t.pf[principal] = pf
      end
      t.lists[principal][pri] = key
      if not t.has[pri] then t.has[pri] = true; t.pris[#t.pris + 1] = pri end
    end
  end
  local function before(a, b, fa, fb, now_v)
    local sa, sb = math.max(now_v, fa), math.max(now_v, fb)
    if sa ~= sb then return sa < sb end
    if fa ~= fb then return fa < fb end
    return a < b
  end
  local tt = {{}}
  for _, team in ipairs(teams) do tt[team] = get(m, 't:' .. team) end
  table.sort(teams, function(a, b) return before(a, b, tt[a], tt[b], V) end)
  local out = {{}}
  for _, team in ipairs(teams) do
    local t, vt, pt = by_team[team], get(m, 'v:' .. team), {{}}
    for _, principal in ipairs(t.principals) do pt[principal] = get(m, t.pf[principal]) end
    table.sort(t.principals, function(a, b) return before(a, b, pt[a], pt[b], vt) end)
    table.sort(t.pris)  -- only the priorities the team's lists have, most urgent first
    for _, pri in ipairs(t.pris) do
      for _, principal in ipairs(t.principals) do
        local key = t.lists[principal][pri]
        if key then out[#out + 1] = key end
      end
    end
  end
  return out
end
"""

# KEYS: [1] registry, [2] tags, [3] waiting, [4] wake list, [5] shares.
# ARGV: [1] now (s), [2] the list just popped ('' none), [3] estimate when svc is unknown (ms),
#       [4] the number of corrections, then per correction: a fair queue or list, its service ms, the ms charged.
# Returns {charged ms ('' if nothing was charged), list, list, ..., wake list}.
_PICK = LIB + """
local now, popped, ncorr = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[4])
local extra = {popped}
for c = 0, ncorr - 1 do extra[#extra + 1] = ARGV[5 + 3 * c] end
local m = load(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], extra)
for c = 0, ncorr - 1 do correct(m, ARGV[5 + 3 * c], tonumber(ARGV[6 + 3 * c]), tonumber(ARGV[7 + 3 * c])) end
local charged = ''
if popped == m.WAKE then
  redis.call('DEL', m.WAKE)  -- the token did its work: this call sees the new lists
elseif popped ~= '' then
  charged = charge(m, popped, tonumber(ARGV[3]))
end
recount(m, now)
write(m)
local out = order(m)
table.insert(out, 1, charged)
out[#out + 1] = m.WAKE
return out
"""

PICK_SHA = hashlib.sha1(_PICK.encode()).hexdigest()


@dataclass(frozen=True)
class Pick:
    """What one call of the script returned: the ms charged for the popped list (None: none), the order."""

    charged_ms: float | None
    order: list[str]


def pick_command(model: str, *, popped: str | None = None,
                 corrections: Iterable[tuple[str, float, float]] = (), now: float | None = None,
                 default_estimate_ms: float = DEFAULT_ESTIMATE_MS) -> tuple[str, ...]:
    """The ``EVALSHA`` of one pick (command name first), for a caller that sends it and reads the reply
    later (:mod:`workers.contract.deferred_replies`); :func:`pick` is the same call, waited for."""
    flat: list[str] = []
    for queue, actual_ms, charged_ms in corrections:
        flat += [queue, repr(float(actual_ms)), repr(float(charged_ms))]
    keys = (registry_key(model), tags_key(model), waiting_key(model), wake_key(model), SHARES_KEY)
    return ("EVALSHA", PICK_SHA, str(len(keys)), *keys, repr(time.time() if now is None else now), popped or "",
            repr(default_estimate_ms), str(len(flat) // 3), *flat)


def parse_pick(reply: Sequence[bytes | str]) -> Pick:
    """A pick's reply as a :class:`Pick`."""
    values = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
    return Pick(float(values[0]) if values[0] else None, values[1:])


def load_script(client: redis.Redis) -> None:
    """Load the script into Redis (after a SCRIPT FLUSH or a restart, an ``EVALSHA`` answers NOSCRIPT)."""
    client.script_load(_PICK)


def pick(client: redis.Redis, model: str, *, popped: str | None = None,
         corrections: Iterable[tuple[str, float, float]] = (), now: float | None = None,
         default_estimate_ms: float = DEFAULT_ESTIMATE_MS) -> Pick:
    """Charge ``popped`` (a list of ``model`` just BRPOPped, if any), apply ``corrections``
    (fair queue, service ms, ms charged) and return the order of ``model``'s fair lists (wake list last).

    One ``EVALSHA``; after a SCRIPT FLUSH or a Redis restart (NOSCRIPT) the
    script is loaded and the call retried once. Raises ``RedisError``.
    """
    command = pick_command(model, popped=popped, corrections=corrections, now=now,
                           default_estimate_ms=default_estimate_ms)
    try:
        reply = client.execute_command(*command)
    except NoScriptError:
        load_script(client)
        reply = client.execute_command(*command)
    return parse_pick(reply)
