"""The Celery application both sides use: the gateway to send, workers to run.

Settings are chosen for a queue where losing a request is worse than running
it twice (and running it twice is made harmless by the task's idempotency):
late acks, redelivery when a worker process dies, one task prefetched at a
time so a slow generation does not hold others hostage.
"""

from __future__ import annotations

from celery import Celery

from workers.contract import celery_redis_url

#: How long results stay in Redis: long enough for a slow client, short
#: enough that Redis does not become a second audit log.
RESULT_EXPIRES_S = 3600


def make_celery(redis_url: str) -> Celery:
    """A configured Celery app on ``redis_url`` (broker and result backend)."""
    url = celery_redis_url(redis_url)
    app = Celery("govgate", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=False,
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue="govgate.default",
        enable_utc=True,
    )
    return app
