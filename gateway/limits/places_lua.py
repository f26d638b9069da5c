"""The queue's place check in Lua, shared by the admit script and the two push scripts.

Two steps may take a request's place in a model's queue: the admit script
(``gateway/limits/scripts.py``) when it reserves after the policy allowed
(the first request of a principal, team and model, or a replacement), and
the push (``gateway/dispatch/queue.py``, ``gateway/dispatch/fair_push.py``)
of a request whose reservation was made early, before its decision, and so
took no place (probe p2 #1: a flood of requests the policy then denied held
places for the time of their decisions, and other requests were refused
``queue_full``). Both must count and judge the same way, so both run these
functions: the model's jobs (its lists in fifo mode, its waiting hash per
team in fair mode) plus the places held in its admitting hash
(``gateway/limits/admitting.py``), against ``GOVGATE_MAX_QUEUED_PER_MODEL``
or the team's cap (``gateway/limits/fair_share.py``).

The functions read only the keys they are given (one Redis, not a Cluster:
the queue's keys are Celery's). Nothing here writes: a caller deletes the
expired places it is told of when its own writes allow.
"""

from __future__ import annotations

#: Lua functions (no statement runs): ``places_held``, ``lists_depth``, ``fair_places``, ``fair_refusal``.
PLACES_LUA = """
-- The places held in the admitting hash `key` (request id -> '<team field> <expiry µs>') at `now` (µs): how
-- many live ones other requests hold, in all and per team field; whether request `id` holds one (never
-- counted against it); and the fields past their expiry (a gateway died holding them: not counted).
local function places_held(key, id, now)
  local flat = redis.call('HGETALL', key)
  local total, teams, own, expired = 0, {}, false, {}
  for k = 1, #flat, 2 do
    local team, until_ = string.match(flat[k + 1], '^(%S*) (%d+)$')
    until_ = tonumber(until_)
    if flat[k] == id then own = true
    elseif not until_ or until_ <= now then expired[#expired + 1] = flat[k]
    else total, teams[team] = total + 1, (teams[team] or 0) + 1 end
  end
  return total, teams, own, expired
end

-- fifo: the jobs in the lists KEYS[first..]: one EXISTS, then LLEN only until the non-empty ones are found
-- (the likeliest list comes first: gateway/limits/queue.py).
local function lists_depth(first)
  if #KEYS < first then return 0 end
  local nonempty = redis.call('EXISTS', unpack(KEYS, first))
  local total = 0
  for k = first, #KEYS do
    if nonempty == 0 then break end
    local n = redis.call('LLEN', KEYS[k])
    if n > 0 then total, nonempty = total + n, nonempty - 1 end
  end
  return total
end

-- Fair share: the model's places per team, its waiting jobs (the waiting hash, one HGETALL) and the places
-- held (`holds`, per team): the total, team `team`'s, and the other teams holding places.
local function fair_places(waiting_key, holds, team)
  local flat = redis.call('HGETALL', waiting_key)
  local places = {}
  for k = 1, #flat, 2 do
    local n = tonumber(flat[k + 1]) or 0
    if n > 0 then places[flat[k]] = n end
  end
  for t, n in pairs(holds) do places[t] = (places[t] or 0) + n end
  local total, mine, others = 0, 0, {}
  for t, n in pairs(places) do
    total = total + n
    if t == team then mine = n else others[#others + 1] = t end
  end
  return total, mine, others
end

-- A team without a weight of its own has the '*' one, else 1 (gateway/policy/shares.py writes the hash).
local function positive_weight(v)
  local n = tonumber(v)
  if n and n > 0 then return n end
  return nil
end

-- The team's weight and the waiting teams' (its own included), from the shares hash: one HMGET, and none
-- while no other team waits (the team then has every place).
local function fair_weights(shares_key, team, others)
  if #others == 0 then return 1, 1 end
  local got = redis.call('HMGET', shares_key, team, '*', unpack(others))
  local default = positive_weight(got[2]) or 1
  local w = positive_weight(got[1]) or default
  local sum = w
  for k = 3, #got do sum = sum + (positive_weight(got[k]) or default) end
  return w, sum
end

-- A team may hold max(1, floor(limit × w / W)) waiting jobs (gateway/limits/fair_share.py, team_cap); all
-- teams together never reach twice the limit. nil admits; a refusal carries what its 429 needs (the mean
-- service time and the live workers: two reads, on the refusal only). `q`: limit, team, shares (key), tags
-- (key), workers (the live workers' key), prefix (the model's members there), now (µs).
local function fair_refusal(q, total, mine, others)
  local ceiling = total >= 2 * q.limit
  if mine == 0 and not ceiling then return nil end
  local w, sum = fair_weights(q.shares, q.team, others)
  local cap = q.limit
  if sum > w then cap = math.max(1, math.floor(q.limit * w / sum + 1e-9)) end
  if mine < cap and not ceiling then return nil end
  local svc = redis.call('HGET', q.tags, 'svc') or ''
  local members = redis.call('ZRANGEBYSCORE', q.workers, '(' .. math.floor(q.now / 1000000), '+inf')
  local live = 0
  for _, m in ipairs(members) do
    if string.sub(m, 1, #q.prefix) == q.prefix then live = live + 1 end
  end
  return {'queue_full', total, mine, cap, tostring(w), tostring(sum), svc, live, ceiling and 1 or 0}
end
"""
