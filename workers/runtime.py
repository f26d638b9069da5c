"""A Celery worker that serves one model's queue.

The model is loaded in each pool process after fork (``worker_process_init``),
never in the parent: llama.cpp-based backends hang in a child forked after
the parent ran inference, and a model per process is the unit of capacity
anyway. The database engine is made after fork for the same reason
(connections must not be shared across fork).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from audit import AuditStore, make_engine, migrate
from workers.backends import LoadedModel, load_model
from workers.celery_app import make_celery
from workers.contract import GENERATE_TASK, LOADED_TTL_S, GenerateJob, loaded_key, queue_for
from workers.generation import run_job
from workers.registry import ModelSpec
from workers.streams import RedisJobChannel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; built by the CLI from the settings."""

    model: ModelSpec
    redis_url: str
    database_url: str
    concurrency: int = 1
    loglevel: str = "INFO"
    time_limit_s: float = 300.0


class _ProcessState:
    """Per-process model and audit store, filled in after fork."""

    config: WorkerConfig | None = None
    model: LoadedModel | None = None
    store: AuditStore | None = None
    redis: redis.Redis | None = None


_state = _ProcessState()


def _load_in_child(**_: Any) -> None:
    config = _state.config
    assert config is not None, "worker started without configuration"
    started = time.perf_counter()
    engine = make_engine(config.database_url)
    _state.store = AuditStore(engine)
    _state.redis = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
    _state.model = load_model(config.model)
    log.info("pid %d loaded model %s from %s in %.2fs", os.getpid(), config.model.name,
             config.model.path, time.perf_counter() - started)
    try:  # tells `govgate up` the model is served now; the worker runs without it
        _state.redis.set(loaded_key(config.model.name, os.getppid()), os.getpid(), ex=LOADED_TTL_S)
    except redis.RedisError as exc:
        log.warning("could not announce the loaded model: %s", exc)


def _dispose_in_child(**_: Any) -> None:
    if _state.store is not None:
        _state.store.engine.dispose()
    if _state.redis is not None:
        _state.redis.close()


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """The Celery task body: run one job with this process's model."""
    if _state.model is None or _state.store is None:
        _load_in_child()
    job = GenerateJob.from_payload(payload)
    if _state.config and job.model != _state.config.model.name:
        raise ValueError(f"job for model {job.model!r} reached the worker of {_state.config.model.name!r}")
    channel = RedisJobChannel(_state.redis, job.request_id, streaming=job.stream)
    return run_job(job, _state.model, _state.store, channel).to_payload()


def build_worker_app(config: WorkerConfig) -> Celery:
    """The Celery app with the generate task registered and the fork hooks wired."""
    _state.config = config
    app = make_celery(config.redis_url, time_limit_s=config.time_limit_s)
    app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True)(generate)
    worker_process_init.connect(_load_in_child, weak=False)
    worker_process_shutdown.connect(_dispose_in_child, weak=False)
    return app


def run_worker(config: WorkerConfig) -> None:
    """Run a worker for ``config.model`` until it is told to stop (blocks)."""
    # The schema must exist before the first append; migrating is idempotent.
    engine = make_engine(config.database_url)
    migrate(engine)
    engine.dispose()
    app = build_worker_app(config)
    app.worker_main([
        "worker",
        f"--loglevel={config.loglevel}",
        "--pool=prefork",
        f"--concurrency={config.concurrency}",
        f"--queues={queue_for(config.model.name)}",
        f"--hostname={config.model.name}.{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ])
