"""A Celery worker that serves one model's queue.

The model and the database engine are made in each pool process after fork,
never in the parent (see :func:`build_worker_app`); jobs and results are
sealed and Celery's success line is cut to ids and timings, so neither Redis
nor the log holds a prompt or an output.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celery.app.trace

import redis
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import Engine

from audit import AuditError, AuditStore, make_engine, migrate
from workers.backends import LoadedModel, load_model
from workers.contract.celery_config import make_celery
from workers.contract.jobs import GENERATE_TASK, LOADED_TTL_S, STATUS_FAILED, GenerateJob, loaded_key, queue_for
from workers.generation import run_job
from workers.contract.pending_terminals import PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.registry import ModelSpec
from workers.contract.sealing import SealError, Sealer, load_or_create_key
from workers.replies import deliver, failure, success
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
    time_limit_s: float = 60.0
    #: Key files shared with the gateway (created on first use when missing).
    payload_key_file: Path = Path("var/keys/payload.key")
    digest_key_file: Path = Path("var/keys/digest.key")
    #: How long a terminal entry the database refused is retried before it is given up.
    terminal_retry_horizon_s: float = 86400.0


class _ProcessState:
    """Per-process model and audit store, filled in after fork."""

    config: WorkerConfig | None = None
    model: LoadedModel | None = None
    store: AuditStore | None = None
    redis: redis.Redis | None = None
    sealer: Sealer | None = None
    digester: Digester | None = None
    pending: PendingTerminals | None = None
    next_pending_check: float = 0.0


_state = _ProcessState()


def _load_in_child(**_: Any) -> None:
    config = _state.config
    assert config is not None, "worker started without configuration"
    started = time.perf_counter()
    engine = make_engine(config.database_url)
    _state.store = AuditStore(engine)
    _state.redis = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
    _state.sealer = Sealer(load_or_create_key(config.payload_key_file))
    _state.digester = Digester(load_or_create_key(config.digest_key_file))
    _state.pending = _pending_terminals(_state.redis, config, _state.sealer)
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


def generate(payload: dict[str, Any]) -> None:
    """The Celery task body: run one sealed job and hand its outcome to its gateway.

    The outcome (the sealed result, or the exception a task raised) is
    published on the gateway's reply channel and stored briefly
    (:mod:`workers.replies`); Celery keeps no result (``ignore_result``).
    A worker killed mid-job delivers nothing: the broker redelivers the job
    (late ack, ``reject_on_worker_lost``) and the next run delivers it.
    Nothing is returned: a return value would only be pickled back to the
    pool's parent process for nobody.
    """
    request_id, reply_to = _reply_address(payload)
    try:
        sealed = _run_sealed(payload)
    except Exception as exc:
        if _state.redis is not None:  # else the gateway's own timeout ends the request
            deliver(_state.redis, request_id, reply_to, failure(exc))
        raise
    assert _state.redis is not None
    deliver(_state.redis, request_id, reply_to, success(sealed))


def _reply_address(payload: Any) -> tuple[str, str]:
    """The request id and reply channel a task argument names in clear ("?" and "" if it names none)."""
    if not isinstance(payload, dict):
        return "?", ""
    return str(payload.get("request_id", "?")), str(payload.get("reply_to") or "")


def _run_sealed(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one sealed job with this process's model; its result, sealed.

    A job this worker cannot unseal (another key) fails without text; the
    gateway records the failure, since the worker cannot read whose it is.
    """
    if _state.model is None or _state.store is None or _state.sealer is None:
        _load_in_child()
    try:
        job = GenerateJob.unsealed(payload, _state.sealer)
    except (SealError, KeyError, TypeError, ValueError) as exc:
        log.error("job %s cannot be unsealed (%s): do the gateway and this worker share the payload key?",
                  payload.get("request_id") if isinstance(payload, dict) else "?", exc)
        return {"status": STATUS_FAILED, "error": {
            "code": "payload_unreadable", "message": "the worker could not unseal the job (payload key mismatch)"}}
    if _state.config and job.model != _state.config.model.name:
        raise ValueError(f"job for model {job.model!r} reached the worker of {_state.config.model.name!r}")
    channel = RedisJobChannel(_state.redis, job.request_id, streaming=job.stream, sealer=_state.sealer,
                              reply_to=job.reply_to)
    result = run_job(job, _state.model, _state.store, channel, _state.pending, digester=_state.digester)
    if result.audit_seq is not None and _state.pending is not None and _pending_check_due():
        if _state.pending.count():
            _state.pending.write_all(_state.store)  # the database takes writes again: catch up
    return result.sealed(_state.sealer)


#: Least time between two looks for kept terminal entries after a recorded job. The
#: gateway's retry loop writes them anyway; the look here only makes it sooner, so
#: one HLEN per job would buy little.
PENDING_CHECK_INTERVAL_S = 5.0


def _pending_check_due() -> bool:
    now = time.monotonic()
    if now < _state.next_pending_check:
        return False
    _state.next_pending_check = now + PENDING_CHECK_INTERVAL_S
    return True


#: Celery's success line without the return value (it logs ``%(return_value)s`` by default).
_LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


def _pending_terminals(client: redis.Redis, config: WorkerConfig, sealer: Sealer) -> PendingTerminals:
    """The store of terminal entries waiting for the database; they hold output, so they are sealed."""
    return PendingTerminals(client, horizon_s=config.terminal_retry_horizon_s, seal=sealer.seal,
                            unseal=sealer.unseal)


def _migrate_when_writable(engine: Engine) -> None:
    """Migrate, waiting as long as the database is locked instead of failing the start."""
    while True:
        try:
            migrate(engine)
            return
        except AuditError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            log.warning("the audit database is locked (%s); waiting for it before serving", exc)
            time.sleep(1.0)


def build_worker_app(config: WorkerConfig) -> Celery:
    """The Celery app with the generate task registered and the fork hooks wired."""
    _state.config = config
    celery.app.trace.LOG_SUCCESS = _LOG_SUCCESS
    app = make_celery(config.redis_url, time_limit_s=config.time_limit_s)
    # ignore_result: the outcome travels on the gateway's reply channel (workers.replies).
    app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(generate)
    # After fork, in each pool process: llama.cpp-based backends hang in a child
    # forked after the parent ran inference (and a model per process is the unit
    # of capacity anyway); database connections must not cross a fork either.
    worker_process_init.connect(_load_in_child, weak=False)
    worker_process_shutdown.connect(_dispose_in_child, weak=False)
    return app


def run_worker(config: WorkerConfig) -> None:
    """Run a worker for ``config.model`` until it is told to stop (blocks)."""
    # Keys before the pool forks: an unusable key file stops the worker here, with its message.
    sealer = Sealer(load_or_create_key(config.payload_key_file))
    load_or_create_key(config.digest_key_file)
    # The schema must exist before the first append; migrating is idempotent.
    engine = make_engine(config.database_url)
    _migrate_when_writable(engine)
    client = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:  # terminal entries kept while the database was unwritable
        _pending_terminals(client, config, sealer).write_all(AuditStore(engine))
    finally:
        client.close()
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
