"""Which live workers fail every job for a reason of their own: a mark a worker writes and gateways read.

A worker that beats (:mod:`workers.contract.liveness`) counts as live, and
``/readyz`` used to call a model served by it ready however its jobs ended:
a worker given another payload key fails each job ``payload_unreadable``,
one whose audit store refuses its appends each ``audit_unavailable``, and
the probe said ``workers: ok`` throughout (probe s55). Those two are the
worker's own: no client can bring them about, and no job gets past them
until the worker's setup is mended. A failure a job brings (its prompt, its
time limit, a cancel) is not counted: a client could otherwise make every
gateway unready with a few requests.

After :data:`FAILING_AFTER` own failures in a row, the worker's process
writes its member (:func:`workers.contract.liveness.member`) into one hash,
the value the time until which the mark holds (Redis's clock) and the last
failure's code and message; each further own failure renews it, and a job
that completes after a failure deletes it. The mark lapses after
:data:`FAILING_TTL_S` unless renewed: an operator who mends the setup sees
the model ready again at the latest then (the next job renews a mark still
deserved), a load balancer that follows ``/readyz`` is not kept away long
after a passing cause (a database that came back), and a worker killed while
failing leaves nothing behind for long.
Nothing is written while jobs succeed: no command on the usual path.

A gateway reads the live marks with the live-workers set, in the round trip
``/readyz`` and ``/metrics`` already make (:data:`READ_SCRIPT`).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.contract.liveness import HEARTBEAT_TTL_S, SLOT_SEP, model_and_node

#: Hash: field a worker's member, value ``<until> <code>: <message>`` (until: Unix seconds, Redis's clock).
FAILING_KEY = "govgate:workers-failing"
#: The failure codes that are the worker's own (its setup, not the job).
OWN_FAILURES = frozenset({"payload_unreadable", "audit_unavailable"})
#: Own failures in a row before the worker marks itself.
FAILING_AFTER = 3
#: How long a mark holds unless a further own failure renews it: as long as a silent worker counts as live.
FAILING_TTL_S = HEARTBEAT_TTL_S
#: The longest reason kept.
REASON_MAX_CHARS = 300

#: KEYS[1] the hash; ARGV[1] the member, ARGV[2] the TTL in seconds, ARGV[3] the reason. Drops lapsed marks.
MARK_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
local marks = redis.call('HGETALL', KEYS[1])
for i = 1, #marks, 2 do
  local until_ = tonumber(string.match(marks[i + 1], '^(%d+) '))
  if until_ == nil or until_ <= now then redis.call('HDEL', KEYS[1], marks[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ' ' .. ARGV[3])
return 1
"""

#: KEYS[1] the hash; returns ``[member, reason, …]`` of the marks that hold now.
READ_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
local marks = redis.call('HGETALL', KEYS[1])
local holding = {}
for i = 1, #marks, 2 do
  local until_, reason = string.match(marks[i + 1], '^(%d+) (.*)$')
  if until_ ~= nil and tonumber(until_) > now then
    holding[#holding + 1] = marks[i]
    holding[#holding + 1] = reason
  end
end
return holding
"""


def reason_of(code: str, message: str) -> str:
    """A mark's reason: the failure's code and message, one line, bounded."""
    text = f"{code}: {message}" if message else code
    return " ".join(text.split())[:REASON_MAX_CHARS]


def holding_marks(reply: list[bytes | str]) -> dict[str, str]:
    """:data:`READ_SCRIPT`'s answer as member → reason."""
    texts = [raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw) for raw in reply]
    return dict(zip(texts[0::2], texts[1::2]))


@dataclass(frozen=True)
class Failing:
    """A model's live workers that hold a mark, and the reason one of them gave."""

    workers: int
    reason: str


def failing_workers(live: list[bytes | str], marks: dict[str, str]) -> dict[str, Failing]:
    """Per model, its live workers (``live``: :data:`workers.contract.liveness.LIVE_SCRIPT`'s answer) that
    hold a mark (:func:`holding_marks`); a model none of whose live workers holds one is absent."""
    found: dict[str, Failing] = {}
    for raw in live:
        text = raw.decode() if isinstance(raw, bytes) else raw
        model, node = model_and_node(text)
        if SLOT_SEP in node or text not in marks:
            continue
        earlier = found.get(model)
        found[model] = Failing((earlier.workers if earlier else 0) + 1, earlier.reason if earlier else marks[text])
    return found
