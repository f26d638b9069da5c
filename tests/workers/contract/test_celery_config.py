"""The Celery settings both sides share (``workers/contract/celery_config.py``), against the gateway's defaults."""

from __future__ import annotations

from gateway.settings import Settings
from workers.contract.celery_config import make_celery


def test_default_redelivery_comes_before_the_request_timeout():
    """A whole worker's death is rescued only if the broker hands its task on while the client still waits."""
    defaults = Settings()
    app = make_celery("redis://127.0.0.1:1/0", time_limit_s=defaults.generation_time_limit_s)
    try:
        assert app.conf.broker_transport_options["visibility_timeout"] < defaults.request_timeout_s
    finally:
        app.close()


def test_a_lost_broker_connection_does_not_cancel_running_generations():
    """Said, not left to Celery's default, which Celery 6 changes (5.x warns at every connection loss)."""
    app = make_celery("redis://127.0.0.1:1/0")
    try:
        assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
        assert app.conf.task_acks_late is True and app.conf.task_reject_on_worker_lost is True
    finally:
        app.close()
