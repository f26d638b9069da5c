"""The worker's take: one Lua script that moves a job from its queue into the worker's unacked hash.

Why a script and not kombu's BRPOP: BRPOP removes the job on the server and
the unacked bookkeeping (the payload and its delivery time in the worker's hash)
followed from the client, so a worker frozen or killed between the two took
the job with it: nothing restored it and the lost-request sweep ended the
request ``gateway_lost`` minutes later. Here the pop and the bookkeeping are
one atomic step: from the moment a job leaves its list it is in the hash
the restore scan reads (``workers/contract/delivery_owners.py``), so a dead
worker's job goes back to its queue and is run by another.

Redis 6.2 (the embedded one) refuses BRPOP inside scripts and has no
multi-key non-blocking pop (``LMPOP`` is 7.0), so the script finds the first
non-empty list itself: the model's plain lists (``EXISTS`` over those before
the default priority's, ``RPOP`` of that one, then halving with ``EXISTS``
only when it was empty), then the
fair lists in order (``RPOP`` of the first, and ``EXISTS`` halving only
when it is empty). In fair mode the plain lists are looked at only while
the hint ``plain`` in the model's tags hash (read with the tags, so free)
says they may hold a job: a fifo gateway's push that makes a plain list
non-empty sets it, as do a restore or a Celery client's publish to one; a
take that finds them all empty clears it; and once a second (with the
recount) they are looked at anyway, for gateways from before the hint. In fair mode the script also
orders the model's lists and charges the job taken
(:mod:`workers.contract.fair_order`'s functions), so the separate pick the
worker sent after each BRPOP is gone, and every order is made after the
corrections of the jobs acknowledged before it. Those go out under a batch
number that grows with each take carrying new ones; a take that failed may
have run, so its corrections go with the next one again (the worker's next
channel's, when Celery reconnects: ``kombu_redis.Channel``), and the
model's tags record the last batch each worker channel's takes applied
(``cb``, written with the tags, no command more): a batch already applied
is not applied twice (a team charged twice for one job's overrun, the
service mean moved twice).

A script cannot block. A worker whose take finds nothing leaves a token on
its queue's idle list (:func:`workers.contract.queue_layout.idle_key`) and
BRPOPs its queue's bell (and the fair wake list) instead; a push that turns
a list from empty to non-empty moves one idle token to the bell
(``RPOPLPUSH``), waking one idle worker, which then takes. A worker woken so
passes the bell on when jobs remain after its take, and a token stands for
no particular worker: the lists' counts are what must add up (one token out
per worker registered idle). A ring lost (a worker killed while idle leaves
a token nobody answers) costs at most the BRPOP's timeout (kombu's 1 s):
an idle worker takes again after each timeout.

A take also removes the bookkeeping of the deliveries the worker acknowledged
since its last take (their payloads and time fields; under kombu's shared keys
payloads, then index entries), before it pops: the ack sends the next take at once, and the removal rides on it
instead of going out as a command of its own (one send fewer between two
jobs; on a busy two-core machine each send can hand the core to Redis).

A take by a worker whose fair jobs may give way at their start (the solo
pool, ``GOVGATE_FAIR_GIVE_WAY``: it passes its name) notes the fair job it
charged in the model's tags hash (``tk``: per worker the request id, read
from the message the script decodes anyway, and the team and priority of
its list; the latest :data:`MAX_NOTED` workers), written with the tags in
the same ``HSET``; a take that takes none of the model's drops its entry.
A gateway's push that turns a list non-empty marks those jobs for a look
again at their start (``workers/contract/repick.py``).

On the solo pool a take also carries the hand-over of the output the job
before it made (:mod:`workers.contract.handover`): the fallback's ``HSETNX``
in the pending terminals and the report's ``PUBLISH``, run first, before
the removal and the pop, as the job's own pipeline ran them (fallback,
then report). A full Redis refuses a script's first write when it is one
that needs memory, which the ``HSETNX`` is, and the script stops there: a
take refused so runs none of it (a pipeline would have published the
report all the same).

Only a channel that consumes a model queue (``model.<name>``) takes this
way; a Celery client reading its reply queue (a ping, ``celery inspect``)
BRPOPs it as kombu does: no job to keep, and no idle token left behind per
short-lived client.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import redis
from redis.exceptions import NoScriptError

from workers.contract.fair_order import DEFAULT_ESTIMATE_MS, LIB, RECOUNT_EVERY_S
from workers.contract.fair_queues import (APPLIED_FIELD, NOTED_FIELD, SHARES_KEY, registry_key, tags_key, waiting_key,
                                          wake_key)
from workers.contract.handover import PENDING_KEY

#: Most workers noted per model (the most recent kept: a worker gone leaves its entry behind).
MAX_NOTED = 16

#: Most worker channels whose last applied batch of corrections a model's tags keep (the most recent kept).
MAX_APPLIED = 16

#: Most idle tokens kept on a queue's idle list (one per idle worker; more are left by killed workers).
MAX_IDLE_TOKENS = 256

# KEYS: [1] unacked hash, [2] unacked index ('': the delivery's time goes in the hash, beside its payload,
#       under '@' .. tag: an owner's keys, workers/contract/delivery_owners.py), [3] shares, [4] the pending
#       terminals (a hand-over's fallback), then per queue: idle list, bell, its plain lists
#       (priority order), and for a model queue: registry, tags, waiting, wake list.
# ARGV: [1] now (s), [2] estimate when svc is unknown (ms), [3] queues, [4] plain lists per queue,
#       [5] '1': a bell woke this worker, [6] per queue '1'/'0': this worker's idle token is out there,
#       [7] '1': a wake token woke it (the wake lists are cleared), [8] the default priority's place among
#       the plain lists (0-based; its lists are looked at first), [9] per queue '1'/'0': its consumer
#       acknowledges (a job taken from it is booked; a no-ack consumer's, a reply's, is not), [10] this worker's
#       name in the noted jobs ('' none: its starts do not give way), [11] the number n of
#       acknowledged deliveries whose bookkeeping goes first, [12..11+n] their tags, [12+n] the number h of
#       hand-overs, which go before them, then per hand-over: request id, fallback, reply channel, report;
#       then per queue: '1'/'0' a model
#       queue, the number of corrections, the name its corrections' batches are recorded under ('' none), then
#       per correction: a fair queue or list, its service ms, the ms charged, its batch (0: applied whatever the
#       record says).
# Returns {} when nothing was taken, else {list, message, ms charged ('' none), '1' booked / '0' not, the undo
# record of a fair job's charge ('' none: workers/contract/repick.py)}.
_TAKE = LIB + f"""
local HASH, INDEX, SHARES, PENDING = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, est = tonumber(ARGV[1]), tonumber(ARGV[2])
local nq, np = tonumber(ARGV[3]), tonumber(ARGV[4])
local woken, registered, clear_wake = ARGV[5] == '1', ARGV[6], ARGV[7] == '1'
local me, nacked = ARGV[10], tonumber(ARGV[11])
-- the outputs handed over (the solo pool's previous job): the fallback kept, then the report published;
-- first, so that a refused write refuses them before anything else ran, and before the removal
local ho = 13 + nacked
for i = ho, ho + 4 * tonumber(ARGV[12 + nacked]) - 1, 4 do
  redis.call('HSETNX', PENDING, ARGV[i], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[i + 2], ARGV[i + 3])
end
-- the acknowledged deliveries' bookkeeping: payloads with their time fields (an owner's hash), or
-- payloads, then index entries (kombu's layout and order for a removal)
if nacked > 0 then
  if INDEX == '' then
    local fields = {{}}
    for i = 12, 11 + nacked do
      fields[#fields + 1] = ARGV[i]
      fields[#fields + 1] = '@' .. ARGV[i]
    end
    redis.call('HDEL', HASH, unpack(fields))
  else
    redis.call('HDEL', HASH, unpack(ARGV, 12, 11 + nacked))
    redis.call('ZREM', INDEX, unpack(ARGV, 12, 11 + nacked))
  end
end
local function exists(keys, lo, hi)
  local n = 0
  for i = lo, hi, 1000 do n = n + redis.call('EXISTS', unpack(keys, i, math.min(i + 999, hi))) end
  return n > 0
end
-- pop from the first non-empty list of keys[lo..hi], which hold at least one job; ``guess``, the most
-- likely (the default priority's), is tried first, and then they need not hold one
local function pop_first(keys, lo, hi, guess)
  if guess and guess >= lo and guess <= hi then
    if guess > lo and exists(keys, lo, guess - 1) then
      hi = guess - 1
    else
      local v = redis.call('RPOP', keys[guess])
      if v then return keys[guess], v end
      if guess == hi or not exists(keys, guess + 1, hi) then return nil, nil end
      lo = guess + 1
    end
  end
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if exists(keys, lo, mid) then hi = mid else lo = mid + 1 end
  end
  return keys[lo], redis.call('RPOP', keys[lo])
end

-- the last batch of corrections ``writer`` had applied (APPLIED_FIELD: "<writer> <batch>" per worker channel), and
-- that record with ``batch`` as its latest (the most recent {MAX_APPLIED} writers kept)
local function applied(text, writer)
  for w, b in string.gmatch(text or '', '(%S+) (%S+)') do if w == writer then return tonumber(b) or 0 end end
  return 0
end
local function with_applied(text, writer, batch)
  local out = {{}}
  for w, b in string.gmatch(text or '', '(%S+) (%S+)') do if w ~= writer then out[#out + 1] = w .. ' ' .. b end end
  out[#out + 1] = writer .. ' ' .. batch
  return table.concat(out, ' ', math.max(1, #out - {MAX_APPLIED} + 1))
end

local queues, k, a = {{}}, 5, 13 + nacked + 4 * tonumber(ARGV[12 + nacked])
for q = 1, nq do
  local Q = {{idle = KEYS[k], bell = KEYS[k + 1], plain = {{}}, registered = string.sub(registered, q, q) == '1',
             book = string.sub(ARGV[9], q, q) == '1'}}
  k = k + 2
  for p = 1, np do Q.plain[p] = KEYS[k]; k = k + 1 end
  local is_model, ncorr, writer = ARGV[a] == '1', tonumber(ARGV[a + 1]), ARGV[a + 2]
  a = a + 3
  -- the tags hash whole (the tags of the registered lists are what it holds), and in it 'L', the
  -- registry's members; the registry itself only when 'L' is missing (a push that registered a new
  -- list, or a restore, deleted it) or a second old (the time of the recount, 'rc', or of the last
  -- look that found no list: a registry written without deleting 'L' shows within a second)
  local members, all, listed = nil, nil, false
  if is_model then
    all = redis.call('HGETALL', KEYS[k + 1])
    local copy, rc = nil, 0
    for i = 1, #all, 2 do
      if all[i] == 'L' then copy = all[i + 1] elseif all[i] == 'rc' then rc = tonumber(all[i + 1]) or 0
      elseif all[i] == '{NOTED_FIELD}' then Q.noted = all[i + 1]
      elseif all[i] == '{APPLIED_FIELD}' then Q.applied = all[i + 1] end
    end
    local ok, list = pcall(cjson.decode, copy or '')
    if ok and type(list) == 'table' and now - rc < {RECOUNT_EVERY_S} then members = list
    else members, listed = redis.call('ZRANGE', KEYS[k], 0, -1), true end
  end
  if is_model and (#members > 0 or ncorr > 0) then  -- a model with no fair lists costs one HGETALL
    local extra = {{}}
    for c = 0, ncorr - 1 do extra[#extra + 1] = ARGV[a + 4 * c] end
    local m = load(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], SHARES, extra, members, all)
    m.listed = true
    if listed then set_list(m, members) end
    -- a batch this writer's takes applied already (a take sent again after its reply was lost, or one
    -- that ran late) is not applied twice: the batches grow with each take that carries new ones
    local last = writer ~= '' and applied(Q.applied, writer) or 0
    local newest = last
    for c = 0, ncorr - 1 do
      local batch = tonumber(ARGV[a + 3 + 4 * c]) or 0
      if batch == 0 or batch > last then
        correct(m, ARGV[a + 4 * c], tonumber(ARGV[a + 1 + 4 * c]), tonumber(ARGV[a + 2 + 4 * c]))
      end
      if batch > newest then newest = batch end
    end
    if writer ~= '' and newest > last then set(m, '{APPLIED_FIELD}', with_applied(Q.applied, writer, newest)) end
    -- wake tokens (a new list) are for workers that order from a cached registry; this call reads it anew
    local recounted = recount(m, now)
    if recounted or clear_wake then redis.call('DEL', m.WAKE) end
    -- the plain lists are looked at only while the hint says they may hold a job (a fifo push, a restore
    -- or kombu's publish sets it); once a second they are looked at anyway (a gateway from before the hint)
    if (m.tag['plain'] or 0) <= 0 and recounted and exists(Q.plain, 1, np) then set(m, 'plain', 1) end
    Q.skip_plain = (m.tag['plain'] or 0) <= 0
    Q.m = m
    Q.order = order(m)
  elseif listed then
    redis.call('HSET', KEYS[k + 1], 'L', cjson.encode(members), 'rc', ARGV[1])  -- none: '{{}}'
  end
  if is_model then k = k + 4 end
  a = a + 4 * ncorr
  queues[q] = Q
end

-- the plain lists first (priority by priority across the queues), then each model's fair lists in order
local plain, all, looked = {{}}, {{}}, 0
for q = 1, nq do if not queues[q].skip_plain then looked = looked + 1 end end
local owner = {{}}  -- plain list → its queue
for p = 1, np do
  for q = 1, nq do
    if not queues[q].skip_plain then
      plain[#plain + 1] = queues[q].plain[p]
      owner[queues[q].plain[p]] = queues[q]
    end
  end
end
-- the jobs taken and not started yet, noted for the pushes (workers/contract/repick.py): '{NOTED_FIELD}' in the
-- tags hash, "<worker> <request id> <team> <priority>" per worker (the fair job it took last; none after a
-- take that took none of the model's), the latest last, at most {MAX_NOTED}; written with the tags
local function note(Q, entry)
  local out, had = {{}}, false
  for w, rest in string.gmatch(Q.noted or '', '(%S+) (%S+ %S+ %S+)') do
    if w == me then had = true else out[#out + 1] = w .. ' ' .. rest end
  end
  if not entry and not had then return end
  if entry then out[#out + 1] = me .. ' ' .. entry end
  set(Q.m, '{NOTED_FIELD}', table.concat(out, ' ', math.max(1, #out - {MAX_NOTED} + 1)))
end

local key, item, from, taken_from
if #plain > 0 then
  key, item = pop_first(plain, 1, #plain, math.min(tonumber(ARGV[8]) * looked + 1, #plain))
  if item then taken_from = owner[key] end
  if not item then
    for q = 1, nq do if queues[q].m and not queues[q].skip_plain then set(queues[q].m, 'plain', 0) end end
  end
end
for q = 1, nq do
  local o = queues[q].order
  if not item and o and #o > 0 then
    item = redis.call('RPOP', o[1])
    if item then key = o[1]
    elseif #o > 1 and exists(o, 2, #o) then key, item = pop_first(o, 2, #o) end
    if item then from = queues[q]; taken_from = from end
  end
end

if not item then
  for q = 1, nq do
    local Q = queues[q]
    if Q.m then
      if me ~= '' then note(Q, nil) end
      write(Q.m)
    end
    if not Q.registered and redis.call('LPUSH', Q.idle, '1') > {MAX_IDLE_TOKENS} then
      redis.call('LTRIM', Q.idle, 0, {MAX_IDLE_TOKENS - 1})
    end
  end
  return {{}}
end

-- the bookkeeping kombu's QoS wrote from the client: the payload under its tag and its time (none for a
-- consumer that does not acknowledge: nothing would remove it)
local booked, tag, exchange, routing_key = '0', nil, nil, nil
local ok, message = pcall(cjson.decode, item)
if ok and type(message) == 'table' and type(message.properties) == 'table' then
  tag = message.properties.delivery_tag
  local info = message.properties.delivery_info
  if type(info) == 'table' then exchange, routing_key = info.exchange, info.routing_key end
end
if taken_from.book and type(tag) == 'string' and type(exchange) == 'string' and type(routing_key) == 'string' then
  local payload = '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']'
  if INDEX == '' then
    redis.call('HSET', HASH, tag, payload, '@' .. tag, ARGV[1])
  else
    redis.call('HSET', HASH, tag, payload)
    redis.call('ZADD', INDEX, now, tag)
  end
  booked = '1'
end

-- the charge, and what a start that gives way needs to undo it (workers/contract/repick.py): the counts of
-- changes and of lists turned non-empty after it, and the tags it moves, before it
-- and, for a push to mark it (a job booked here, whose request id, the task's id, reads plainly), the job
local charged, undo, noted = '', '', nil
if from then
  local m = from.m
  local team, _, _, pri, pf = parts(key)
  local before = {{get(m, 'V'), get(m, 't:' .. team), get(m, 'v:' .. team), get(m, pf)}}
  charged = charge(m, key, est)
  set(m, 'cs', get(m, 'cs') + 1)
  undo = string.format('%d %d %.17g %.17g %.17g %.17g', get(m, 'cs'), get(m, 'np'), unpack(before))
  local id = ok and type(message) == 'table' and type(message.headers) == 'table' and message.headers.id
  if me ~= '' and booked == '1' and type(id) == 'string' and #id <= 200 and string.find(id, '^%S+$') then
    noted = id .. ' ' .. team .. ' ' .. pri
  end
end
for q = 1, nq do
  local Q = queues[q]
  if Q.m then
    if me ~= '' then note(Q, Q == from and noted or nil) end
    write(Q.m)
  end
  if Q.registered and not redis.call('RPOP', Q.idle) then redis.call('RPOP', Q.bell) end  -- not idle now
end
if woken then
  -- woken by a bell rung for one job: wake another idle worker if jobs remain
  for _, v in ipairs(plain) do all[#all + 1] = v end
  for q = 1, nq do for _, v in ipairs(queues[q].order or {{}}) do all[#all + 1] = v end end
  if #all > 0 and exists(all, 1, #all) then
    for q = 1, nq do redis.call('RPOPLPUSH', queues[q].idle, queues[q].bell) end
  end
end
return {{key, item, charged, booked, undo}}
"""

TAKE_SHA = hashlib.sha1(_TAKE.encode()).hexdigest()


@dataclass
class TakeQueue:
    """One queue a worker consumes, as the take sees it: its idle list and bell, its plain lists (priority
    order), the model it serves (None: not a model queue) and the corrections to apply before ordering:
    (fair list, service ms, ms charged, batch), the batch left out or 0 for one applied whatever was
    applied before. ``writer`` names the channel whose batches the model's tags record (``''``: none): a
    correction of a batch the record says was applied is not applied again."""

    idle: str
    bell: str
    plain: list[str]
    model: str | None = None
    corrections: list[tuple[str, float, float] | tuple[str, float, float, int]] = field(default_factory=list)
    writer: str = ""


@dataclass(frozen=True)
class Taken:
    """A take's job: the list it came from, the message as stored, the ms charged (None: not a fair job)
    and whether the script wrote its unacked bookkeeping (not for a no-ack consumer, nor a message it
    could not read)."""

    key: str
    item: str
    charged_ms: float | None
    booked: bool
    #: what a start that gives way needs to undo the charge (``cs np V t v p``; None: not a fair job)
    undo: str | None = None


def take_command(hash_key: str, index_key: str | None, queues: Sequence[TakeQueue], *, woken: bool = False,
                 registered: Sequence[bool] = (), book: Sequence[bool] | None = None, clear_wake: bool = False,
                 default_place: int = 0, acked: Sequence[str] = (),
                 hand_overs: Sequence[tuple[str, bytes, str, bytes]] = (), now: float | None = None,
                 default_estimate_ms: float = DEFAULT_ESTIMATE_MS, noted_as: str = "") -> tuple[str, ...]:
    """The ``EVALSHA`` of one take (command name first); ``registered``: per queue, whether this worker's
    idle token is out there (default: none); ``default_place``: the default priority's place in the
    plain lists' priority order; ``book``: per queue, whether its consumer acknowledges (default: all);
    ``acked``: tags of acknowledged deliveries whose bookkeeping (in ``hash_key``, and ``index_key`` or
    their time fields) the take removes before it pops; ``index_key`` None: the deliveries' times go in
    the hash (an owner's keys), else in that index (kombu's); ``hand_overs``: (request id, sealed
    fallback, reply channel, report message) of outputs handed over, run before anything else;
    ``noted_as``: this worker's name (no blank) when its starts may give way: the fair job it takes is noted
    for the pushes to mark (``workers/contract/repick.py``; '' notes nothing)."""
    if not queues:
        raise ValueError("a take needs at least one queue")
    if noted_as.split() != ([noted_as] if noted_as else []):
        raise ValueError("a worker's name in the noted jobs is one word")
    plain_count = len(queues[0].plain)
    if any(len(queue.plain) != plain_count for queue in queues):
        raise ValueError("every queue has as many plain lists")
    keys: list[str] = [hash_key, index_key or "", SHARES_KEY, PENDING_KEY]
    per_queue: list[str] = []
    for queue in queues:
        keys += [queue.idle, queue.bell, *queue.plain]
        if queue.model is not None:
            keys += [registry_key(queue.model), tags_key(queue.model), waiting_key(queue.model),
                     wake_key(queue.model)]
        if queue.writer.split() != ([queue.writer] if queue.writer else []):
            raise ValueError("a writer's name in the applied batches is one word")
        per_queue += ["1" if queue.model is not None else "0", str(len(queue.corrections)), queue.writer]
        for fair, actual_ms, charged_ms, *batch in queue.corrections:
            per_queue += [fair, repr(float(actual_ms)), repr(float(charged_ms)), str(int(batch[0]) if batch else 0)]
    flags = "".join("1" if registered and registered[i] else "0" for i in range(len(queues)))
    booked = "".join("1" if book is None or book[i] else "0" for i in range(len(queues)))
    return ("EVALSHA", TAKE_SHA, str(len(keys)), *keys, repr(time.time() if now is None else now),
            repr(default_estimate_ms), str(len(queues)), str(plain_count), "1" if woken else "0", flags,
            "1" if clear_wake else "0", str(default_place), booked, noted_as, str(len(acked)), *acked,
            str(len(hand_overs)), *(part for hand_over in hand_overs for part in hand_over), *per_queue)


def parse_take(reply: Sequence[Any]) -> Taken | None:
    """A take's reply: the job taken, or None when every list was empty (the worker is now registered idle)."""
    if not reply:
        return None
    key, item, charged, booked, *rest = (value.decode() if isinstance(value, bytes) else str(value)
                                         for value in reply)
    return Taken(key, item, float(charged) if charged else None, booked == "1", rest[0] if rest and rest[0] else None)


def load_script(client: redis.Redis) -> None:
    """Load the script into Redis (after a SCRIPT FLUSH or a restart, an ``EVALSHA`` answers NOSCRIPT)."""
    client.script_load(_TAKE)


def take(client: redis.Redis, hash_key: str, index_key: str | None, queues: Sequence[TakeQueue], **options: Any) -> Taken | None:
    """One take, waited for (tests and tools; the worker sends it on its polling connection). Loads the
    script once on NOSCRIPT. Raises ``RedisError``."""
    command = take_command(hash_key, index_key, queues, **options)
    try:
        reply = client.execute_command(*command)
    except NoScriptError:
        load_script(client)
        reply = client.execute_command(*command)
    return parse_take(reply)
