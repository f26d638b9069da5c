"""Whether the gateway waiting for a job is still there: a heartbeat every gateway writes and workers read.

A gateway killed (SIGKILL, the OOM killer) while its jobs waited in the
queue left them to be generated for nobody when a worker reached them,
holding the model for as long as each took. Its reply channel says nothing
of it: pub/sub has no memory, and ``PUBSUB NUMSUB`` also reads 0 while a
live gateway's subscriber reconnects (Redis drops a subscriber that reads
too slowly), which would cancel a request whose client still waits.

So each gateway refreshes its member of one sorted set (its reply channel)
every :data:`GATEWAY_BEAT_INTERVAL_S`, scored with the time (by Redis's
clock, so machines' clocks need not agree) until which it counts as there;
a gateway that stops cleanly scores itself "gone now". A worker that takes
a job which waited (the jobs a dead gateway leaves behind, the ones that
already cost a look in the audit log) asks once: a member whose time has
passed is a gateway gone, and its job is recorded ``cancelled`` instead of
generated. A channel the set does not hold (a gateway older than this
protocol, or one forgotten after :data:`GATEWAY_FORGET_AFTER_S`) counts as
there: the job runs, as it always did.

Unlike the workers' set (``workers.contract.liveness``) a member is not
dropped when its time passes: a missing member must mean "unknown", not
"gone". Each beat drops the members gone for longer than any job waits.
"""

from __future__ import annotations

#: The error code of a job not generated because its gateway was gone (a ``cancelled`` end).
GATEWAY_GONE = "gateway_gone"

#: Sorted set: member = a gateway's reply channel, score = there until (Unix seconds, Redis's clock).
GATEWAYS_KEY = "govgate:gateways"
GATEWAY_BEAT_INTERVAL_S = 5.0
#: A gateway silent this long counts as gone (three missed beats and some slack for a busy event loop).
GATEWAY_BEAT_TTL_S = 20
#: Members gone this long are dropped: past any job's deadline under a request timeout shorter than two
#: days (``GOVGATE_REQUEST_TIMEOUT_S``, 120 s by default, has no upper bound); a job whose gateway was
#: dropped earlier reads it as unknown and runs, as before this protocol.
GATEWAY_FORGET_AFTER_S = 2 * 24 * 3600

#: KEYS[1] the set; ARGV[1] the gateway's reply channel, ARGV[2] seconds it counts as there from now (0: a
#: clean stop, gone now), ARGV[3] how long gone members are kept.
GATEWAY_BEAT_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[3])))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

#: KEYS[1] the set; ARGV[1] a reply channel. 1: its gateway is gone; 0: there, or not known.
GATEWAY_GONE_SCRIPT = """
local until_ = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ then return 0 end
if tonumber(redis.call('TIME')[1]) >= tonumber(until_) then return 1 end
return 0
"""
