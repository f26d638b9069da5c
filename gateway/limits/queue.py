"""The model's queue as the admission script reads it: its Redis lists, likeliest first (fifo), or its
teams' waiting counts and shares (fair share); in both, the places held by requests admitted but not yet
queued (``gateway/limits/admitting.py``).

The script counts the lists that exist with one ``EXISTS`` and reads
lengths (``LLEN``) only until it has found that many, so the list the
request's priority will use, read first, usually ends the count after one
``LLEN`` instead of ten. The order changes the cost, never the sum.
"""

from __future__ import annotations

from gateway.limits.admitting import admitting_key
from gateway.limits.counters import QueueCheck
from gateway.limits.fair_share import team_field
from workers.contract.queue_layout import DEFAULT_PRIORITY, queue_keys
from workers.contract.fair_queues import SHARES_KEY, tags_key, waiting_key
from workers.contract.jobs import queue_for
from workers.contract.liveness import WORKERS_KEY, member


def model_queue(model: str, limit: int, likely_priority: int | None = None) -> QueueCheck:
    """The check of ``model``'s queue against ``limit``, the list of ``likely_priority`` first.

    ``likely_priority`` is a policy ``priority`` obligation (0–9; None is
    the queue's default, ``DEFAULT_PRIORITY``).
    """
    keys = queue_keys(queue_for(model))
    first = DEFAULT_PRIORITY if likely_priority is None else likely_priority
    if 0 <= first < len(keys):
        keys = [keys[first], *keys[:first], *keys[first + 1:]]
    return QueueCheck(tuple(keys), limit, admitting=admitting_key(model))


def fair_model_queue(model: str, team: str | None, limit: int) -> QueueCheck:
    """The check of ``team``'s places in ``model``'s fair-share queue (``team`` None: no team).

    The script reads the model's waiting hash and admitting hash (an HGETALL each), the shares of
    the teams waiting (one HMGET, only when the team has jobs waiting and
    others do too), and, to time its refusal, the workers' mean service time
    and the live workers.
    """
    keys = (waiting_key(model), SHARES_KEY, tags_key(model), WORKERS_KEY)
    return QueueCheck(keys, limit, team=team_field(team), worker_prefix=member(model, ""),
                      admitting=admitting_key(model))
