"""The model's queue as the admission script reads it: its Redis lists, likeliest first.

The script counts the lists that exist with one ``EXISTS`` and reads
lengths (``LLEN``) only until it has found that many, so the list the
request's priority will use, read first, usually ends the count after one
``LLEN`` instead of ten. The order changes the cost, never the sum.
"""

from __future__ import annotations

from gateway.limits.counters import QueueCheck
from workers.contract.celery_config import DEFAULT_PRIORITY, queue_keys
from workers.contract.jobs import queue_for


def model_queue(model: str, limit: int, likely_priority: int | None = None) -> QueueCheck:
    """The check of ``model``'s queue against ``limit``, the list of ``likely_priority`` first.

    ``likely_priority`` is a policy ``priority`` obligation (0–9; None is
    the queue's default, ``DEFAULT_PRIORITY``).
    """
    keys = queue_keys(queue_for(model))
    first = DEFAULT_PRIORITY if likely_priority is None else likely_priority
    if 0 <= first < len(keys):
        keys = [keys[first], *keys[:first], *keys[first + 1:]]
    return QueueCheck(tuple(keys), limit)
