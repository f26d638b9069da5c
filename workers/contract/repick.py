"""A fair job's start that gives way: when a fairer job arrived since the take, the taken one goes back.

Why: the worker's take pops the next job right at the previous job's end,
and nearly all of the hand-over between two jobs (Celery's delivery, the
trace, unsealing: about a millisecond) comes after it. A job of a team
furthest below its share pushed in that window found the worker's choice
already made, and waited for the whole slot of the job taken before it
(issue 12; docs/architecture.md, "Fair share", "A start that gives way").

So the start looks again, but only when told to. The take notes the fair
job it charged in the model's tags hash (``tk``: per worker its last job's
request id, team and priority; written with the tags, no command more); a
gateway's push that turns a list non-empty (``LPUSH`` answers 1) marks each
noted job whose list it could come before (another team's, or a more urgent
one of the same team) with :data:`~workers.contract.jobs.JOB_LOOK_AGAIN` in
its state key (``SET … NX``: never over a start or a cancel). The start's
claim stays the plain ``SET … GET``
(:meth:`workers.streams.RedisJobChannel.claim_start`); only when it reads
the mark does it run this module's script, with the claim already made: if
no take or correction touched the tags since the take (``cs``, counted by
every charge and correction) and a list turned non-empty since (``np``,
counted by the pushes: a mark older than this take, left by a worker that
took the job before and never started it, says nothing), it restores the
tags the take's charge moved to their values before it, orders the lists as
the take would have, and when a list of another team (or a more urgent one
of the same team) now comes first and holds a job, and the taken list is
still registered (no take looks at a list a recount dropped), it undoes the
claim (``DEL`` of the state key: the job has not started, and its next start
is a first run), puts the job back at the head of its list (``RPUSH``: kombu
pops with ``RPOP``), removes its bookkeeping from the worker's hash and
counts it waiting again, all in one step; the worker returns without running
it, and its next take (sent at the ack) picks the fairer job. Not a job whose
client left: a cancel the gateway wrote over the mark before the claim is
what the claim reads (no script), and one written between the claim and the
script is what the script finds in the state key: either ends the job now,
as a cancel does. Otherwise the claim stands. A restore (a worker died, a job
was rejected) marks nothing: a job taken meanwhile does not give way to it.

Only where the take's process runs the job (the solo pool: the delivery
hands the task its :class:`Ticket` here, :func:`offering`; its takes note
jobs only then: ``kombu_redis.GIVE_WAY_OPTION``) and only under a worker's own keys
(``workers/contract/delivery_owners.py``: under kombu's shared keys another
worker's booking of the same delivery tag could be removed). A start without
a ticket (a prefork pool, ``GOVGATE_FAIR_GIVE_WAY=0``) that reads a mark
takes it for a first run.

Costs: nothing on a start the push did not mark (the claim's ``SET`` alone);
the push that turns a list non-empty reads the noted jobs (``HGET``) and
sends a ``SET NX`` per job it could pass; a marked start adds the script's
``EVALSHA`` and ``HMGET``, and the ordering when the counts allow a give-way.
Until 2026-12-02 every fair start on the solo pool ran the script (two
commands more a job). A job that gives way costs the worker one more
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

#: Tags-hash field counting the lists that turned non-empty (the gateways' pushes).
NEW_LISTS_FIELD = "np"
#: Tags-hash field counting the changes of the tags (charges, corrections, jobs put back).
CHANGES_FIELD = "cs"
#: Tags-hash field counting the jobs that gave way at their start.
GAVE_WAY_FIELD = "gw"

# Run after the claim (``SET … GET``) read the look-again mark: the job's state key holds ``started`` since, or
# whatever was written after the claim.
# KEYS: [1] the job's state key, [2] the worker's unacked hash, [3] the list the job was taken from,
#       [4] registry, [5] tags, [6] waiting, [7] wake list, [8] shares.
# ARGV: [1] the started mark, [2] the look-again mark, [3] the delivery tag, [4] its time field, [5] the
#       message as taken, [6] cs and [7] np after the take, [8..11] V, the team's, the team's virtual and the
#       principal's tag before the take's charge.
# Returns {1}: put back, the claim undone; {0}: the claim stands; {0, was}: it stands, and ``was``, a cancel
# written since the claim, ends the job now.
_START = LIB + f"""
local cur = redis.call('HMGET', KEYS[5], '{CHANGES_FIELD}', '{NEW_LISTS_FIELD}')
if tonumber(cur[1] or 0) ~= tonumber(ARGV[6]) or tonumber(cur[2] or 0) == tonumber(ARGV[7]) then
  -- another take or correction since (its order stands), or no list turned non-empty (the mark is older
  -- than this take: the job was taken before, by a worker that did not start it)
  return {{0}}
end
local popped = KEYS[3]
local team, _, _, pri, pf = parts(popped)
if not team then return {{0}} end
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
  -- unless its client left since the claim (a cancel: the job ends now, its request's slot freed, instead
  -- of waiting for its turn again) or the bookkeeping is gone (restored meanwhile: the claim stands)
  local state = redis.call('GET', KEYS[1])
  if state and state ~= ARGV[1] and state ~= ARGV[2] then return {{0, state}} end
  if redis.call('HDEL', KEYS[2], ARGV[3]) == 0 then return {{0}} end
  redis.call('DEL', KEYS[1])  -- the claim undone: the job has not started (its next start is a first run)
  redis.call('HDEL', KEYS[2], ARGV[4])
  redis.call('RPUSH', popped, ARGV[5])
  redis.call('HINCRBY', KEYS[6], team, 1)
  set(m, '{CHANGES_FIELD}', get(m, '{CHANGES_FIELD}') + 1)
  set(m, '{GAVE_WAY_FIELD}', get(m, '{GAVE_WAY_FIELD}') + 1)
  write(m)
  return {{1}}
end
return {{0}}
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


def start_command(ticket: Ticket, state_key: str, started: bytes, look_again: bytes) -> tuple[Any, ...]:
    """The ``EVALSHA`` of the look again at a start whose claim read the look-again mark (command name first)."""
    cs, np, *before = ticket.undo.split()
    keys = (state_key, ticket.hash_key, ticket.key, registry_key(ticket.model), tags_key(ticket.model),
            waiting_key(ticket.model), wake_key(ticket.model), SHARES_KEY)
    return ("EVALSHA", START_SHA, len(keys), *keys, started, look_again, ticket.tag, ticket.time_field,
            ticket.item, cs, np, *before)


def load_script(client: redis.Redis) -> None:
    """Load the look again's script into Redis (after a SCRIPT FLUSH or a restart its ``EVALSHA`` answers
    NOSCRIPT, and :func:`look_again` loads it then)."""
    client.script_load(_START)


def look_again(client: redis.Redis, ticket: Ticket, state_key: str, started: bytes,
               look_again_mark: bytes) -> tuple[bool, Any]:
    """After a claim that read the look-again mark: (True, None) when the job went back (the ticket is
    told; its claim undone), else (False, a cancel written since the claim, or None). Loads the script
    once on NOSCRIPT; raises ``RedisError``.

    A reply lost (the connection dropped or timed out after the script was sent) leaves it unknown
    whether the script ran, and how: the job's bookkeeping tells. Gone, the job is back on its list
    (this script put it back, or a sweep did): it is put back here too, not answered failed, since
    it runs again from its list. Still there, the script left the claim standing or never ran: the
    error stands, as for a lost reply to the claim's ``SET``. The look itself failing leaves the error
    too."""
    command = start_command(ticket, state_key, started, look_again_mark)
    try:
        try:
            reply = client.execute_command(*command)
        except NoScriptError:
            load_script(client)
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
