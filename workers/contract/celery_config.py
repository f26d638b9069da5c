"""The Celery application workers run, on the queue layout both sides share.

The layout (lists, priorities, time limits) is :mod:`workers.contract.queue_layout`,
which imports no Celery: the gateway writes task messages itself
(``gateway/dispatch/celery_message.py``) into the lists it names.

Settings are chosen for a queue where losing a request is worse than running
it twice (and running it twice is made harmless by the task's idempotency):
late acks, redelivery when a worker process dies, one task prefetched at a
time so a slow generation does not hold others hostage. There is no result
backend: a job's outcome travels on its gateway's reply channel
(``workers.replies``), one SET+PUBLISH instead of Celery's per-request
result key, subscription and polling.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from celery import Celery

from workers.contract.kombu_redis import GIVE_WAY_OPTION, OWNER_OPTION, TRANSPORT_NAME  # importing it registers the transport
from workers.contract.queue_layout import (DEFAULT_PRIORITY, HARD_LIMIT_GRACE_S, PRIORITY_SEP, PRIORITY_STEPS,
                                           VISIBILITY_MARGIN_S, visibility_timeout_s)

def celery_redis_url(redis_url: str) -> str:
    """Turn a redis-py URL into the broker URL Celery's workers and the gateway use.

    redis-py spells a unix socket ``unix:///path?db=N``; kombu wants
    ``<transport>+socket:///path?virtual_host=N``. The transport is
    :mod:`workers.contract.kombu_redis` (kombu's Redis transport without a
    new client per ack); ``rediss://`` (TLS) stays on kombu's own.
    """
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return f"{TRANSPORT_NAME}+socket://{parts.path}?virtual_host={db}"
    if parts.scheme == "redis":
        return TRANSPORT_NAME + redis_url[len("redis"):]
    return redis_url


def make_celery(redis_url: str, *, time_limit_s: float = 60.0,
                redelivery_margin_s: float = VISIBILITY_MARGIN_S, owner: str | None = None,
                give_way: bool = False) -> Celery:
    """A configured Celery app on ``redis_url`` (the broker; no result backend).

    ``time_limit_s`` is a generation's soft time limit; the hard limit and
    the broker's visibility timeout are derived from it so they stay in the
    order that makes redelivery safe (soft < hard < visibility).
    ``redelivery_margin_s`` is the visibility timeout's margin over the hard
    limit (:func:`visibility_timeout_s`); a worker that restores another live
    worker's task past it applies its own, so workers sharing a Redis should
    agree. ``owner`` (a worker's Celery node name) keeps that worker's
    unacknowledged deliveries under keys of its own, so they go back at once
    when it dies (:mod:`workers.contract.delivery_owners`); without it, in
    kombu's shared keys (clients that never consume). ``give_way``: the
    worker's fair jobs may give way at their start (a solo pool with
    ``GOVGATE_FAIR_GIVE_WAY`` on, and an ``owner``): its takes note them for
    the gateways' pushes to mark (``workers/contract/repick.py``).
    """
    url = celery_redis_url(redis_url)
    hard_limit_s = time_limit_s + HARD_LIMIT_GRACE_S
    app = Celery("govgate", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=False,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # A generation goes on through a lost broker connection (Celery 5's default, which Celery 6 will
        # change; 5.x warns at every connection loss while it is off, and workers.runtime hides that
        # warning): its terminal entry is written to the database either way, its ack then fails and kombu
        # restores the delivery, whose next run finds that entry and does not generate again. Cancelling
        # would throw away every running generation at each Redis blip and run them all again.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue="govgate.default",
        task_default_priority=DEFAULT_PRIORITY,
        task_soft_time_limit=time_limit_s,
        task_time_limit=hard_limit_s,
        broker_transport_options={
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            "sep": PRIORITY_SEP,
            "visibility_timeout": visibility_timeout_s(time_limit_s, redelivery_margin_s),
            # Look for abandoned messages every ~2 s (default: ~100 s).
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            **({OWNER_OPTION: owner} if owner else {}),
            **({GIVE_WAY_OPTION: True} if owner and give_way else {}),
        },
        enable_utc=True,
    )
    return app
