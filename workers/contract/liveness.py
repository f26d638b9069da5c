"""Which workers are alive, per model: a heartbeat every worker writes and gateways read.

Nothing a worker wrote to Redis before said it was *still* alive: the
``govgate:loaded:`` key lives a day, and kombu's pidbox bindings outlive a
killed worker for an hour or more. A Celery ping answers, but costs a
broadcast and a wait per question. So each worker's main process refreshes
its member of one sorted set every :data:`HEARTBEAT_INTERVAL_S`, scored with
the time (by Redis's clock, so machines' clocks need not agree) until which
it counts as alive; a gateway counts the members whose time has not passed.
A worker stopped cleanly removes itself; a killed one drops out within
:data:`HEARTBEAT_TTL_S`.

One key for all models, so ``/readyz`` and ``/metrics`` read every model's
workers in one command, and the set never holds more members than there are
workers (each heartbeat also drops the expired ones).
"""

from __future__ import annotations

#: Sorted set: member ``<model>\n<worker name>``, score = alive until (Unix seconds, Redis's clock).
WORKERS_KEY = "govgate:workers"
HEARTBEAT_INTERVAL_S = 5.0
#: A worker silent this long no longer counts (three missed beats).
HEARTBEAT_TTL_S = 15

#: KEYS[1] the set; ARGV[1] the member, ARGV[2] the TTL in seconds.
BEAT_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

#: KEYS[1] the set; returns the members alive now.
LIVE_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


#: ``govgate:model-failed:<model>``: why the model's last worker could not load it (its text, a week's TTL).
#: Written by a worker whose load failed, deleted by one whose load succeeded; a gateway refuses the
#: model's requests at once while it has no live worker and this key is there, instead of queueing them
#: to time out (gateway/dispatch/model_health.py).
MODEL_FAILED_PREFIX = "govgate:model-failed:"
MODEL_FAILED_TTL_S = 7 * 24 * 3600
#: The longest reason kept (a backend's error can quote a whole path and more).
MODEL_FAILED_MAX_CHARS = 500


def model_failed_key(model: str) -> str:
    return f"{MODEL_FAILED_PREFIX}{model}"


def member(model: str, worker: str) -> str:
    """A worker's member of :data:`WORKERS_KEY` (``worker``: Celery's node name, unique per worker)."""
    return f"{model}\n{worker}"


def live_counts(members: list[bytes | str]) -> dict[str, int]:
    """Live workers per model, from :data:`LIVE_SCRIPT`'s answer."""
    counts: dict[str, int] = {}
    for raw in members:
        text = raw.decode() if isinstance(raw, bytes) else raw
        model = text.split("\n", 1)[0]
        counts[model] = counts.get(model, 0) + 1
    return counts
