"""A Celery worker that serves one model's queue.

With Celery's solo pool (``GOVGATE_WORKER_POOL=solo``, the default) the job
runs in this process, which loads the model, the audit store and the
generation code (:mod:`workers.pool`) once, before it consumes, and keeps the
time limits itself (:mod:`workers.job_limits`). With the prefork pool this is
only the worker's main process: it consumes the queue and runs the pool, and
imports no more than that needs (Celery, kombu, the transport); the rest lives
in each pool process, imported after fork. The audit schema is
migrated by a short-lived child before the worker consumes
(:mod:`workers.store_prep`). Jobs and results are sealed and Celery's
success line is cut to ids and timings, so neither Redis nor the log holds a
prompt or an output.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celery.app.trace
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from workers.contract.celery_config import make_celery
from workers.contract.queue_layout import HARD_LIMIT_GRACE_S
from workers.contract.jobs import GENERATE_TASK, queue_for
from workers.contract.liveness import worker_node
from workers.contract.registry import ModelSpec
from workers.contract.sealing import load_or_create_key
from workers.contract.redis_refusal import EXIT_REDIS_REFUSED, write_refusal

if TYPE_CHECKING:
    from workers.heartbeat import Heartbeat
    from workers.job_limits import JobTimeLimits
    from workers.store_prep import StorePrep

log = logging.getLogger(__name__)

#: Celery pools a worker runs (``GOVGATE_WORKER_POOL``): a pool process per slot, forked and watched by the
#: worker's main process, or the job in the main process itself (one at a time, no IPC between two jobs).
POOL_PREFORK = "prefork"
POOL_SOLO = "solo"
WORKER_POOLS = (POOL_PREFORK, POOL_SOLO)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; built by the CLI from the settings."""

    model: ModelSpec
    redis_url: str
    database_url: str
    concurrency: int = 1
    #: Celery's pool (:data:`WORKER_POOLS`); solo runs one job at a time, so its concurrency is 1.
    pool: str = POOL_SOLO
    #: A solo pool's jobs leave their output's hand-over for the ack's take to carry (``GOVGATE_HANDOVER_ON_TAKE``).
    handover_on_take: bool = True
    #: A solo pool's fair job may give way at its start to a fairer one (``GOVGATE_FAIR_GIVE_WAY``).
    fair_give_way: bool = True
    #: How long an audit write waits for a locked database before it fails (``GOVGATE_DATABASE_BUSY_TIMEOUT_S``).
    database_busy_timeout_s: float = 30.0
    loglevel: str = "INFO"
    time_limit_s: float = 60.0
    #: Longest a new pool process may take to load the model (``GOVGATE_WORKER_START_TIMEOUT_S``).
    start_timeout_s: float = 300.0
    #: The broker's visibility timeout over the hard limit (``GOVGATE_REDELIVERY_MARGIN_S``): how long after a
    #: whole worker died this worker hands its unacknowledged task to another (restores run in the consumers).
    redelivery_margin_s: float = 30.0
    #: Key files shared with the gateway (created on first use when missing).
    payload_key_file: Path = Path("var/keys/payload.key")
    digest_key_file: Path = Path("var/keys/digest.key")
    #: How long a terminal entry the database refused is retried before it is given up.
    terminal_retry_horizon_s: float = 86400.0
    #: Seconds between two looks for kept terminal entries that are due (``GOVGATE_TERMINAL_RETRY_INTERVAL_S``).
    terminal_retry_interval_s: float = 5.0
    #: Longest a checked job waits for its gateway's output verdict before it records ``output_unchecked``.
    output_verdict_timeout_s: float = 10.0
    #: Least time between two pieces of a stream (``GOVGATE_STREAM_FLUSH_INTERVAL_MS``, in seconds here; the
    #: default is ``workers.streams.STREAM_FLUSH_INTERVAL_S``, not imported: the main process must not load it).
    stream_flush_interval_s: float = 0.01
    #: Celery's startup banner on stdout (off when logs are JSON: every line must be a JSON object).
    banner: bool = True


class _Config:
    """The configuration :func:`build_worker_app` was given, for the pool processes it forks."""

    value: WorkerConfig | None = None
    #: The child readying the audit store, waited for before the pool forks.
    store_prep: StorePrep | None = None
    #: What the store-prep child handed back, how the jobs append (a DriverPlan's JSON; None until it is done).
    store_plan: str | None = None
    #: The main process's heartbeat (``workers.heartbeat``), once the worker consumes.
    heartbeat: Heartbeat | None = None
    #: The solo pool's time limits, once started (None with prefork, where Celery keeps them).
    limits: JobTimeLimits | None = None
    #: Prefork: one byte shared with the pool processes (an anonymous mapping made before they fork),
    #: set by one that could not load what it serves, so the main process exits 1 (:func:`_load_in_child`).
    load_failed: mmap.mmap | None = None


_config = _Config()


def _wait_for_store(**_: Any) -> None:
    """Before the pool forks (Celery's ``worker_init``): the schema exists and kept entries are written.

    The child hands back how to append on the database driver (:class:`audit.driver_plan.DriverPlan`),
    which the pool processes (or, solo, this one) use: no process of a worker but that child loads SQLAlchemy.
    """
    if _config.store_prep is not None:
        _config.store_plan = _config.store_prep.wait()


#: The exit status of a process that could not load what it serves (Celery's own for a failed start).
EXIT_CANNOT_SERVE = 1


def _load_in_child(**_: Any) -> None:
    """Load the model and the audit store where the jobs run; a process that cannot, exits.

    Celery calls this from its ``worker_process_init`` signal, which logs an
    exception from a receiver and carries on: the process would then take
    jobs without a model and fail every one (loading again, and leaving a
    thread and a database engine behind, each time). ``SystemExit`` is not
    caught there. Under the solo pool it leaves the worker's construction,
    and the worker exits 1 before it consumes anything; ``govgate up``
    reports it and applies its restart policy. A prefork pool process that
    only exited would be replaced by Celery every few seconds, each failing
    alike, so it also marks the failure where the main process reads it and
    asks that process for a warm shutdown: the worker exits 1 as well, its
    jobs left in the queue.
    """
    from workers import pool  # after fork (prefork): the main process never holds the model or the audit store

    assert _config.value is not None, "worker started without configuration"
    try:
        pool.load(_config.value, _config.store_plan)
    except Exception as exc:
        solo = _config.value.pool == POOL_SOLO
        name, reason = _config.value.model.name, str(exc)
        reason = reason.removeprefix(f"model {name}: ")  # backend errors name the model already
        log.critical("model %s cannot be served, the worker stops: %s", name, reason)
        _say_model_failed(_config.value, reason)
        if not solo and _config.load_failed is not None:
            _config.load_failed[0] = 1
            os.kill(os.getppid(), signal.SIGTERM)  # the main process's warm shutdown; it exits 1 (run_worker)
        raise SystemExit(EXIT_CANNOT_SERVE) from None
    if _config.value.pool == POOL_SOLO:  # the worker's own process, main thread, before the first job
        from workers.job_limits import JobTimeLimits

        limits = JobTimeLimits(_config.value.time_limit_s, _config.value.time_limit_s + HARD_LIMIT_GRACE_S)
        limits.start()
        _config.limits = limits
    else:  # a prefork pool process, set up for its life
        _freeze_heap()


def _say_model_failed(config: WorkerConfig, reason: str) -> None:
    """Tell gateways why the model cannot be served (they refuse its requests at once while no worker
    lives); best effort: a Redis that cannot take it leaves them queueing, as before."""
    import redis

    from workers.contract.liveness import MODEL_FAILED_MAX_CHARS, MODEL_FAILED_TTL_S, model_failed_key

    try:
        client = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.set(model_failed_key(config.model.name), reason[:MODEL_FAILED_MAX_CHARS], ex=MODEL_FAILED_TTL_S)
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        log.warning("could not tell gateways that model %s cannot be served: %s", config.model.name, exc)


def _freeze_heap(**_: Any) -> None:
    """Move what the process made to start out of the garbage collector's reach (:func:`gc.freeze`).

    Celery, kombu, the audit store and the backend are ~140,000 tracked
    objects that live as long as the worker; each full (generation 2)
    collection walked them all, a 60–70 ms stall between two jobs, measured
    during ``bench/fairness.py``. After the freeze a full collection walks
    only what was made since. One collection first, so no startup garbage is
    kept; reference counting frees frozen objects as usual. In the main
    process once it consumes (Celery's ``worker_ready``: under the solo pool
    the model and the job's parts are loaded by then), and in each prefork
    pool process once its model is loaded.
    """
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen: %d objects out of the garbage collector's reach", gc.get_freeze_count())


def _dispose_in_child(**_: Any) -> None:
    from workers import pool

    pool.dispose()


def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """Once the worker consumes (Celery's ``worker_ready``, main process): beat until shutdown."""
    from workers.heartbeat import Heartbeat

    assert _config.value is not None, "worker started without configuration"
    name = getattr(sender, "hostname", None) or f"{_config.value.model.name}.{os.getpid()}"
    _config.heartbeat = Heartbeat(_config.value.redis_url, _config.value.model.name, name,
                                  slots=_config.value.concurrency)
    _config.heartbeat.start()


def _stop_heartbeat(**_: Any) -> None:
    if _config.heartbeat is not None:
        _config.heartbeat.stop()
        _config.heartbeat = None


def generate(payload: dict[str, Any]) -> None:
    """The Celery task: :func:`workers.pool.generate` (imported in the process that runs it)."""
    from workers import pool

    if _config.limits is None:
        pool.generate(payload)
        return
    with _config.limits.running():
        pool.generate(payload)


#: Celery's success line without the return value (it logs ``%(return_value)s`` by default).
_LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
#: The logger of Celery's "Task …[id] received" line, written by the main process for every job.
_RECEIVED_LOGGER = "celery.worker.strategy"


def one_line_per_job(loglevel: str) -> None:
    """Keep Celery's success line per job and drop its "received" line at levels above DEBUG.

    The received line repeats the id the success line carries, and the main
    process writes it between taking a job and handing it to the pool: about
    a tenth of that process's CPU per job (profiled under bench/overhead.py),
    on the hand-over between two jobs that fair share's waits are made of.
    At ``GOVGATE_LOG_LEVEL=DEBUG`` it stays. Celery reads the level when its
    consumer starts, so this runs before.
    """
    level = logging.getLevelName(loglevel.upper())
    if not isinstance(level, int) or level > logging.DEBUG:
        logging.getLogger(_RECEIVED_LOGGER).setLevel(logging.WARNING)


def node_name(config: WorkerConfig) -> str:
    """This worker's Celery node name (:func:`workers.contract.liveness.worker_node`)."""
    return worker_node(config.model.name, os.getpid(), socket.gethostname())


def worker_app(config: WorkerConfig) -> Celery:
    """The worker's Celery app: the broker's settings, the pool's start timeout, the generate task."""
    app = make_celery(config.redis_url, time_limit_s=config.time_limit_s,
                      redelivery_margin_s=config.redelivery_margin_s, owner=node_name(config),
                      give_way=config.pool == POOL_SOLO and config.fair_give_way)
    # A pool process says it is up only once worker_process_init has loaded the model (build_worker_app);
    # Celery kills one that has not after worker_proc_alive_timeout, 4 s by default, and starts another,
    # which a model that takes longer to load never survives.
    app.conf.worker_proc_alive_timeout = config.start_timeout_s
    # ignore_result: the outcome travels on the gateway's reply channel (workers.replies).
    app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(generate)
    return app


def check_pool(config: WorkerConfig) -> None:
    """Refuse a pool setting the worker cannot honour (``ValueError`` with what to do instead)."""
    if config.pool not in WORKER_POOLS:
        raise ValueError(f"unknown worker pool {config.pool!r}: use one of {', '.join(WORKER_POOLS)}")
    if config.pool == POOL_SOLO and config.concurrency != 1:
        raise ValueError(f"the solo pool runs one job at a time: for --concurrency {config.concurrency} start "
                         "one worker per slot, or run pool processes with --pool prefork")


def build_worker_app(config: WorkerConfig) -> Celery:
    """The Celery app with the generate task registered and the fork hooks wired."""
    check_pool(config)
    _config.value = config
    celery.app.trace.LOG_SUCCESS = _LOG_SUCCESS
    one_line_per_job(config.loglevel)
    app = worker_app(config)
    # After fork, in each pool process: llama.cpp-based backends hang in a child
    # forked after the parent ran inference (and a model per process is the unit
    # of capacity anyway); database connections must not cross a fork either.
    # The solo pool sends worker_process_init in the main process as it is made
    # (after worker_init), and no worker_process_shutdown: the worker's own does.
    worker_init.connect(_wait_for_store, weak=False)
    worker_process_init.connect(_load_in_child, weak=False)
    _config.limits = None  # the solo pool's, started where its jobs run (_load_in_child)
    _config.load_failed = None if config.pool == POOL_SOLO else mmap.mmap(-1, 1)  # shared with forked children
    if config.pool == POOL_SOLO:
        worker_shutdown.connect(_dispose_in_child, weak=False)
    else:
        worker_process_shutdown.connect(_dispose_in_child, weak=False)
    worker_ready.connect(_start_heartbeat, weak=False)
    worker_ready.connect(_freeze_heap, weak=False)
    worker_shutdown.connect(_stop_heartbeat, weak=False)
    return app


def _note_write_refusal(worker: Any) -> list[str]:
    """What Redis refused, filled when Celery stops ``worker`` for an error that is Redis refusing a write.

    Celery catches the error that ends its consumer (``WorkController.start``: "Unrecoverable error") and
    calls ``stop(exitcode=1)`` from inside that ``except``, where the error is still the one being handled;
    nothing else of it reaches the caller. Why it matters: ``workers/contract/redis_refusal.py``.
    """
    refused: list[str] = []
    stop = worker.stop

    def stop_noting_refusal(*args: Any, **kwargs: Any) -> Any:
        handled = sys.exc_info()[1]
        why = write_refusal(handled) if handled is not None else None
        if why is not None:
            refused.append(why)
        return stop(*args, **kwargs)

    worker.stop = stop_noting_refusal
    return refused


def run_worker(config: WorkerConfig) -> None:
    """Run a worker for ``config.model`` until it is told to stop (blocks)."""
    from workers.store_prep import StorePrep

    # Keys before the pool forks: an unusable key file stops the worker here, with its message.
    load_or_create_key(config.payload_key_file)
    load_or_create_key(config.digest_key_file)
    # The schema must exist before the first append (migrating is idempotent), and terminal
    # entries kept while the database was unwritable are written: in a child, so that
    # SQLAlchemy and Alembic never load in this process; waited for before the pool forks.
    _config.store_prep = StorePrep.start(config)
    app = build_worker_app(config)
    # Celery's worker class itself, as its `celery worker` command makes it: going through the command
    # (app.worker_main) imports every celery subcommand, the shell's among them, which pulls in
    # prompt_toolkit and pygments: ~9 MB of a worker's memory that never runs a prompt (docs/performance.md).
    worker = app.Worker(
        hostname=node_name(config),
        pool_cls=config.pool,
        loglevel=config.loglevel,
        concurrency=config.concurrency,
        queues=[queue_for(config.model.name)],
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=not config.banner,
    )
    # Celery warns at every lost broker connection that Celery 6 will cancel running late-ack tasks then;
    # make_celery chose not to (worker_cancel_long_running_tasks_on_connection_loss=False, and why), so the
    # warning tells an operator reading a Redis outage's log nothing. After the Worker is made: its log
    # setup puts an "always" filter for Celery's pending deprecations in front of the others.
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")
    refused = _note_write_refusal(worker)
    worker.start()
    if worker.exitcode and refused:  # not a crash of the model: `govgate up` waits and starts it again
        log.critical("model %s: Redis refuses writes (%s); the worker stops with exit code %d, to be started "
                     "again once Redis writes", config.model.name, refused[0], EXIT_REDIS_REFUSED)
        raise SystemExit(EXIT_REDIS_REFUSED)
    if _config.load_failed is not None and _config.load_failed[0]:  # a pool process could not load (_load_in_child)
        # The log's last line, the one `govgate up` shows, names the reason's line above Celery's shutdown lines.
        log.critical("model %s cannot be served, the worker stopped: a pool process could not load it (the "
                     "reason is logged above)", config.model.name)
        raise SystemExit(EXIT_CANNOT_SERVE)
    if worker.exitcode:
        raise SystemExit(worker.exitcode)
