"""The queue layout the gateway and the workers share: lists, priorities, time limits.

Apart from :mod:`workers.contract.celery_config` (the Celery app the workers
run) because the gateway needs only these names: it writes task messages
itself (``gateway/dispatch/celery_message.py``), and importing Celery for a
few constants kept Celery, kombu and their dependencies resident in the API
process (docs/performance.md, "A worker's memory").
"""

from __future__ import annotations

#: Priorities 0 (highest, Celery-on-Redis convention) to 9; each has its own list.
PRIORITY_STEPS = list(range(10))
DEFAULT_PRIORITY = 5
#: Separator between a queue name and its priority (``model.tiny:3``).
PRIORITY_SEP = ":"
#: Hard limit = soft limit + this: time for the task to record its own timeout first.
HARD_LIMIT_GRACE_S = 10.0
#: Visibility timeout = hard limit + this (the default of ``GOVGATE_REDELIVERY_MARGIN_S``).
#: A message unacknowledged for longer is handed to another worker (the whole
#: worker died): the timeout must exceed the longest a task may run, or a slow
#: task would run twice; the margin covers a task that waited in its worker
#: before it started, and clocks that differ a little.
VISIBILITY_MARGIN_S = 30.0


def visibility_timeout_s(time_limit_s: float, margin_s: float = VISIBILITY_MARGIN_S) -> float:
    """When the broker hands a dead worker's unacknowledged task to another.

    A redelivered task can only still serve its client if this is shorter
    than the gateway's request timeout; past that the job's deadline has
    passed and the worker that takes it records it as expired. ``margin_s``
    is ``GOVGATE_REDELIVERY_MARGIN_S``.
    """
    return time_limit_s + HARD_LIMIT_GRACE_S + margin_s


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold one queue's waiting messages, one per priority."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def idle_key(queue: str) -> str:
    """List of tokens, one per worker of ``queue`` whose last take found nothing (``workers/contract/take.py``)."""
    return f"govgate:idle:{queue}"


def bell_key(queue: str) -> str:
    """List idle workers of ``queue`` block on: a push that makes a list non-empty moves an idle token here
    (``RPOPLPUSH``), waking one of them."""
    return f"govgate:bell:{queue}"
