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

#: KEYS[1] the set; ARGV[1] the member, ARGV[2] the TTL in seconds, ARGV[3..] the worker's further members
#: (:func:`slot_members`).
BEAT_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local until_ = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], until_, ARGV[1])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], until_, ARGV[i]) end
return 1
"""
#: Separates a worker's node name from the number of one of its further job slots in its members.
SLOT_SEP = "#"

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


def worker_node(model: str, pid: int, host: str) -> str:
    """A worker's Celery node name, ``<model>.<pid>@<host>`` (``pid``: its main process): unique while it runs,
    as Celery wants; the pool processes name their worker's member (:func:`member`) with it."""
    return f"{model}.{pid}@{host}"


def member(model: str, worker: str) -> str:
    """A worker's member of :data:`WORKERS_KEY` (``worker``: Celery's node name, unique per worker)."""
    return f"{model}\n{worker}"


def slot_members(model: str, worker: str, slots: int = 1) -> list[str]:
    """A worker's members: one per job it runs at once (a prefork worker's ``--concurrency``).

    The first is :func:`member`; the others add ``#2``, ``#3``… to the node
    name (which holds no ``#``). So a gateway that counts members counts the
    jobs the model's workers serve at once: what the queue's estimated waits
    and a refusal's ``Retry-After`` divide the service time by (a worker of
    two pool processes ends jobs twice as often as one of one). Readers that
    want workers count only the first (:func:`live_counts`).
    """
    return [member(model, worker)] + [member(model, f"{worker}{SLOT_SEP}{k}") for k in range(2, max(1, slots) + 1)]


def model_and_node(raw: bytes | str) -> tuple[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    model, _, node = text.partition("\n")
    return model, node


def live_counts(members: list[bytes | str]) -> dict[str, int]:
    """Live workers per model, from :data:`LIVE_SCRIPT`'s answer (a worker's further slots not counted)."""
    counts: dict[str, int] = {}
    for raw in members:
        model, node = model_and_node(raw)
        if SLOT_SEP not in node:
            counts[model] = counts.get(model, 0) + 1
    return counts


def live_slots(members: list[bytes | str]) -> dict[str, int]:
    """Jobs the live workers of each model run at once (every member counts), from the same answer."""
    counts: dict[str, int] = {}
    for raw in members:
        model, _ = model_and_node(raw)
        counts[model] = counts.get(model, 0) + 1
    return counts
