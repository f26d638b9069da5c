"""A fair job's start that gives way: when a fairer job arrived since the take, the taken one goes back.

Why: the worker's take pops the next job right at the previous job's end,
and nearly all of the hand-over between two jobs (Celery's delivery, the
trace, unsealing: about a millisecond) comes after it. A job of a team
furthest below its share pushed in that window found the worker's choice
already made, and waited for the whole slot of the job taken before it
(issue 12; docs/architecture.md, "Fair share", "A start that gives way").
So the job's start claim looks again, in the same script: if a list turned
non-empty since the take (``np``, counted by the pushes and restores in the
model's tags hash) and no take or correction touched the tags since
(``cs``, counted by every charge and correction), it restores the tags the
take's charge moved to their values before it, orders the lists as the take
would have, and when a list of another team (or a more urgent one of the
same team) now comes first and holds a job, and the taken list is still
registered (no take looks at a list a recount dropped), it puts the taken
job back at the head of its list (``RPUSH``: kombu pops with ``RPOP``),
removes its bookkeeping from the worker's hash and counts it waiting again,
all in one step (not a job whose client left: a cancel mark in its state
key, which the claim sees, ends it now); the worker returns without running
it, and its next take (sent at the ack) picks the fairer job. Otherwise the
script makes the start claim
(``SET … GET``, as :meth:`workers.streams.RedisJobChannel.claim_start`).

Only where the take's process runs the job (the solo pool: the delivery
hands the task its :class:`Ticket` here, :func:`offering`) and only under a
worker's own keys (``workers/contract/delivery_owners.py``: under kombu's
shared keys another worker's booking of the same delivery tag could be
removed). A prefork pool's job starts as before.

Costs: the script replaces the claim's ``SET`` and adds one ``HMGET`` of
two fields when nothing changed; the ordering only when a list turned
non-empty meanwhile. A job that gives way costs the worker one more
hand-over (its charge was undone: no team pays for it), and ``gw`` in the
tags hash counts them (``bench/fairness.py`` prints it).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import redis
from redis.exceptions import NoScriptError

from workers.contract.fair_order import LIB
from workers.contract.fair_queues import SHARES_KEY, registry_key, tags_key, waiting_key, wake_key

#: Tags-hash field counting the lists that turned non-empty (pushes and restores).
NEW_LISTS_FIELD = "np"
#: Tags-hash field counting the changes of the tags (charges, corrections, jobs put back).
CHANGES_FIELD = "cs"
#: Tags-hash field counting the jobs that gave way at their start.
GAVE_WAY_FIELD = "gw"

# KEYS: [1] the job's state key, [2] the worker's unacked hash, [3] the list the job was taken from,
#       [4] registry, [5] tags, [6] waiting, [7] wake list, [8] shares.
# ARGV: [1] the started mark, [2] its ttl (s), [3] the delivery tag, [4] its time field, [5] the message as
#       taken, [6] cs and [7] np after the take, [8..11] V, the team's, the team's virtual and the
#       principal's tag before the take's charge.
# Returns {1}: put back; {0} or {0, was}: claimed, ``was`` the state key's value before (none: a first run).
_START = LIB + f"""
local function claim()
  local was = redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'GET')
  if was then return {{0, was}} end
  return {{0}}
end
local cur = redis.call('HMGET', KEYS[5], '{CHANGES_FIELD}', '{NEW_LISTS_FIELD}')
if tonumber(cur[1] or 0) ~= tonumber(ARGV[6]) or tonumber(cur[2] or 0) == tonumber(ARGV[7]) then
  return claim()  -- another take or correction since (its order stands), or no list turned non-empty
end
local popped = KEYS[3]
local team, _, _, pri, pf = parts(popped)
if not team then return claim() end
local m = load(KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], {{}}, nil, redis.call('HGETALL', KEYS[5]))
set(m, 'V', tonumber(ARGV[8])); set(m, 't:' .. team, tonumber(ARGV[9]))
set(m, 'v:' .. team, tonumber(ARGV[10])); set(m, pf, tonumber(ARGV[11]))
-- give way when a list before the taken one holds a job the take would have chosen, and the taken list
-- is in the order at all (registered: a recount may have dropped it since, emptied by the take and
-- registered long ago; the job put back there would wait where no take looks)
local fairer, found = false, false
for _, key in ipairs(order(m)) do
  if key == popped then found = true; break end
  if not fairer then
    local other, _, _, other_pri = parts(key)
    fairer = (other ~= team or other_pri < pri) and redis.call('LLEN', key) > 0
  end
end
if fairer and found then
  -- unless its client left (a cancel mark: the claim sees it and the job ends now, its request's slot
  -- freed, instead of waiting for its turn again) or the bookkeeping is gone (restored meanwhile)
  local state = redis.call('GET', KEYS[1])
  if state and state ~= ARGV[1] then return claim() end
  if redis.call('HDEL', KEYS[2], ARGV[3]) == 0 then return claim() end
  redis.call('HDEL', KEYS[2], ARGV[4])
  redis.call('RPUSH', popped, ARGV[5])
  redis.call('HINCRBY', KEYS[6], team, 1)
  set(m, '{CHANGES_FIELD}', get(m, '{CHANGES_FIELD}') + 1)
  set(m, '{GAVE_WAY_FIELD}', get(m, '{GAVE_WAY_FIELD}') + 1)
  write(m)
  return {{1}}
end
return claim()
"""

START_SHA = hashlib.sha1(_START.encode()).hexdigest()

#: Refusals a command inside the script meets, which Redis reports wrapped in the script's error; the plain
#: claim's ``SET`` raised them as these (a full Redis: "OutOfMemoryError: command not allowed …").
_REFUSALS = {"OOM": redis.exceptions.OutOfMemoryError, "READONLY": redis.exceptions.ReadOnlyError}
_WRAPPED = re.compile(r"-(?P<code>[A-Z]+) (?P<message>[^\n]*)$")


class PutBack(Exception):
    """The job gave way to a fairer one: it is back on its list, not run here."""


@dataclass(frozen=True)
class Ticket:
    """What a fair job's start needs to give way: its delivery, the list and message the take popped, and
    the take's record (``cs np V t v p``: the counts after the take, the tags before its charge)."""

    request_id: str
    tag: str
    time_field: str
    hash_key: str
    model: str
    key: str
    item: str
    undo: str
    #: Told the job went back (the channel forgets its charge: the script undid it).
    on_put_back: Callable[[], None]


_offered: Ticket | None = None


@contextlib.contextmanager
def offering(ticket: Ticket | None) -> Iterator[None]:
    """While a delivery is handed to Celery (under the solo pool its task runs inside): its ticket."""
    global _offered
    previous, _offered = _offered, ticket
    try:
        yield
    finally:
        _offered = previous


def ticket_for(request_id: str) -> Ticket | None:
    """The ticket of the delivery running in this process, if it is ``request_id``'s (else None)."""
    ticket = _offered
    return ticket if ticket is not None and ticket.request_id == request_id else None


def start_command(ticket: Ticket, state_key: str, started: bytes, ttl_s: int) -> tuple[Any, ...]:
    """The ``EVALSHA`` of a start that may give way (command name first)."""
    cs, np, *before = ticket.undo.split()
    keys = (state_key, ticket.hash_key, ticket.key, registry_key(ticket.model), tags_key(ticket.model),
            waiting_key(ticket.model), wake_key(ticket.model), SHARES_KEY)
    return ("EVALSHA", START_SHA, len(keys), *keys, started, ttl_s, ticket.tag, ticket.time_field, ticket.item,
            cs, np, *before)


def start(client: redis.Redis, ticket: Ticket, state_key: str, started: bytes, ttl_s: int) -> tuple[bool, Any]:
    """Run the start: (True, None) when the job went back (the ticket is told), else (False, the state
    key's value before the claim). Loads the script once on NOSCRIPT; raises ``RedisError``.

    A reply lost (the connection dropped or timed out after the script was sent) leaves it unknown
    whether the script ran, and how: the job's bookkeeping tells. Gone, the job is back on its list
    (this script put it back, or a sweep did): it is put back here too, not answered failed, since
    it runs again from its list. Still there, the script claimed or never ran: the error stands, as
    for the plain claim's ``SET``. The look itself failing leaves the error too."""
    command = start_command(ticket, state_key, started, ttl_s)
    try:
        try:
            reply = client.execute_command(*command)
        except NoScriptError:
            client.script_load(_START)
            reply = client.execute_command(*command)
    except redis.ResponseError as exc:
        raise _unwrapped(exc) from None
    except (redis.ConnectionError, redis.TimeoutError):
        try:
            gone = not client.hexists(ticket.hash_key, ticket.tag)
        except redis.RedisError:
            gone = False
        if not gone:
            raise
        reply = [1]
    if int(reply[0]) == 1:
        ticket.on_put_back()
        return True, None
    return False, reply[1] if len(reply) > 1 else None


def _unwrapped(exc: redis.ResponseError) -> redis.ResponseError:
    """A refusal inside the script as the command alone would have raised it (the worker's failure then
    says what it says for the plain claim, not the script's line number); anything else as it came."""
    wrapped = _WRAPPED.search(str(exc)) if type(exc) is redis.ResponseError else None
    refusal = _REFUSALS.get(wrapped["code"]) if wrapped else None
    return refusal(wrapped["message"]) if refusal is not None and wrapped is not None else exc
