"""What a worker's pool process holds and runs: its model, audit store and the task body.

Imported only in the pool process, after fork (:mod:`workers.runtime` names
it lazily): the worker's main process only consumes the queue and never
needs SQLAlchemy, SQLModel, the audit store or the generation code, which
would otherwise stay resident there (tens of MB) for the life of the worker.
The model and the database engine are made here, never in the parent:
llama.cpp-based backends hang in a child forked after the parent ran
inference, and database connections must not cross a fork. With the solo
pool (``GOVGATE_WORKER_POOL=solo``) the worker's main process is its own
pool process: it imports this module and loads it all once, before it
consumes, and forks nothing after.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from audit.driver_plan import DriverPlan
from audit.driver_store import DriverStore
from workers.backends import LoadedModel, load_model
from workers.contract.handover import Carrier
from workers.contract.handover import current as hand_over_carrier
from workers.contract.jobs import LOADED_TTL_S, STATUS_COMPLETED, STATUS_FAILED, GenerateJob, JobResult, loaded_key
from workers.contract.liveness import member, model_failed_key, worker_node
from workers.contract.pending_terminals import PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.repick import Ticket, ticket_for
from workers.contract.sealing import SealError, Sealer, load_or_create_key
from workers.failure_streak import FailureStreak
from workers.generation import HANDED_OVER, PUT_BACK, run_job
from workers.replies import deliver, failure, success
from workers.runtime import POOL_SOLO
from workers.store_prep import pending_terminals
from workers.streams import STREAM_FLUSH_INTERVAL_S, RedisJobChannel

if TYPE_CHECKING:
    from workers.runtime import WorkerConfig

log = logging.getLogger(__name__)


class _ProcessState:
    """Per-process model and audit store, filled in after fork."""

    config: WorkerConfig | None = None
    model: LoadedModel | None = None
    store: DriverStore | None = None
    redis: redis.Redis | None = None
    sealer: Sealer | None = None
    digester: Digester | None = None
    pending: PendingTerminals | None = None
    #: Who runs the jobs, as each terminal entry records it (fixed for the life of the process).
    worker: dict[str, Any] | None = None
    #: This process's own failures in a row, and the mark that tells gateways (workers/contract/failing.py).
    streak: FailureStreak | None = None


_state = _ProcessState()


def load(config: WorkerConfig, plan: DriverPlan | str | None = None) -> None:
    """Load this process's model, audit store, keys and Redis client (once per pool process).

    ``plan`` is what the store-prep child compiled (:mod:`workers.store_prep`; its JSON as handed
    over): the jobs append on the database driver alone, and SQLAlchemy never loads here. Without
    one (a caller that readied the store itself) the plan is compiled here, which loads it.
    """
    _state.config = config
    started = time.perf_counter()
    if isinstance(plan, str):
        plan = DriverPlan.from_json(plan)
    _state.store = DriverStore(plan if plan is not None else _compiled_plan(config))
    _state.redis = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
    _state.sealer = Sealer(load_or_create_key(config.payload_key_file))
    _state.digester = Digester(load_or_create_key(config.digest_key_file))
    _state.pending = pending_terminals(_state.redis, config, _state.sealer)
    _state.worker = {"hostname": socket.gethostname(), "pid": os.getpid()}
    threading.Thread(target=_write_pending_forever,
                     args=(_state.pending, _state.store, config.terminal_retry_interval_s),
                     name="govgate-pending-terminals", daemon=True).start()
    _state.model = load_model(config.model)
    log.info("pid %d loaded model %s from %s in %.2fs", os.getpid(), config.model.name,
             config.model.path, time.perf_counter() - started)
    # The worker's pid names the key: the pool process's parent, or this process with the solo pool.
    worker_pid = os.getpid() if config.pool == POOL_SOLO else os.getppid()
    _state.streak = FailureStreak(_state.redis, member(config.model.name, worker_node(
        config.model.name, worker_pid, socket.gethostname())))
    try:  # tells `govgate up` the model is served now, and gateways that it is no longer failed
        with _state.redis.pipeline(transaction=False) as pipe:
            pipe.set(loaded_key(config.model.name, worker_pid), os.getpid(), ex=LOADED_TTL_S)
            pipe.delete(model_failed_key(config.model.name))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not announce the loaded model: %s", exc)


def _compiled_plan(config: WorkerConfig) -> DriverPlan:
    from audit import make_engine
    from audit.append_plan import driver_plan

    engine = make_engine(config.database_url, busy_timeout_s=config.database_busy_timeout_s)
    try:
        return driver_plan(engine)
    finally:
        engine.dispose()


def dispose() -> None:
    """Close the database connection and Redis client as the pool process exits."""
    if _state.store is not None:
        _state.store.close()
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
    if sealed is not None:  # None: handed over, its gateway records the end and answers
        deliver(_state.redis, request_id, reply_to, success(sealed))


def _reply_address(payload: Any) -> tuple[str, str]:
    """The request id and reply channel a task argument names in clear ("?" and "" if it names none)."""
    if not isinstance(payload, dict):
        return "?", ""
    return str(payload.get("request_id", "?")), str(payload.get("reply_to") or "")


def hand_over_carrier_of(config: WorkerConfig | None) -> Carrier | None:
    """The channel a job leaves its output's hand-over with, or None to send it itself.

    Only a solo pool's job runs inside the delivery whose take could carry
    it, and only with ``GOVGATE_HANDOVER_ON_TAKE`` on: carried, the hand-over
    costs one send fewer between jobs, but a light team's longest waits
    behind another team's burst grew (docs/architecture.md, "Between two
    jobs on the solo pool").
    """
    if config is None or config.pool != POOL_SOLO or not config.handover_on_take:
        return None
    return hand_over_carrier()


def give_way_ticket_of(config: WorkerConfig | None, request_id: str) -> Ticket | None:
    """What lets ``request_id``'s start give way to a fairer job, or None to claim it as it is.

    Only a job running inside the delivery that took it has a ticket (the
    solo pool; a prefork pool process is not the process that took it), and
    only with ``GOVGATE_FAIR_GIVE_WAY`` on (``workers/contract/repick.py``).
    """
    if config is None or config.pool != POOL_SOLO or not config.fair_give_way:
        return None
    return ticket_for(request_id)


def _run_sealed(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Run one sealed job with this process's model; its result, sealed (None: the output was handed over,
    or the job gave way to a fairer one at its start and is queued again).

    A job this worker cannot unseal (another key) fails without text; the
    gateway records the failure, since the worker cannot read whose it is.
    """
    if _state.model is None or _state.store is None or _state.sealer is None:
        # load() runs once per process before any job (workers.runtime._load_in_child), and a process
        # whose load failed has exited; loading here again, per job, left an engine and a thread behind.
        raise RuntimeError("this worker process has no model loaded; it takes no jobs")
    try:
        job = GenerateJob.unsealed(payload, _state.sealer)
    except (SealError, KeyError, TypeError, ValueError) as exc:
        log.error("job %s cannot be unsealed (%s): do the gateway and this worker share the payload key?",
                  payload.get("request_id") if isinstance(payload, dict) else "?", exc)
        unreadable = {"status": STATUS_FAILED, "error": {
            "code": "payload_unreadable", "message": "the worker could not unseal the job (payload key mismatch)"}}
        _note_end(unreadable["status"], unreadable["error"])
        return unreadable
    if _state.config and job.model != _state.config.model.name:
        raise ValueError(f"job for model {job.model!r} reached the worker of {_state.config.model.name!r}")
    client, sealer = _state.redis, _state.sealer
    carrier = hand_over_carrier_of(_state.config)

    def deliver_late(result: JobResult) -> None:  # an end recorded after the task returned (a failed take)
        deliver(client, job.request_id, job.reply_to, success(result.sealed(sealer)))

    channel = RedisJobChannel(client, job.request_id, streaming=job.stream, sealer=sealer,
                              reply_to=job.reply_to, flush_interval_s=_state.config.stream_flush_interval_s
                              if _state.config else STREAM_FLUSH_INTERVAL_S,
                              carrier=carrier, deliver_late=deliver_late,
                              ticket=give_way_ticket_of(_state.config, job.request_id))
    result = run_job(job, _state.model, _state.store, channel, _state.pending, digester=_state.digester,
                     worker=_state.worker, verdict_timeout_s=_state.config.output_verdict_timeout_s
                     if _state.config else 10.0)
    _note_end(STATUS_COMPLETED if result is HANDED_OVER else result.status, result.error)
    if result is HANDED_OVER or result is PUT_BACK:  # its gateway answers, or the job runs later
        return None
    return result.sealed(_state.sealer)


def _note_end(status: str, error: dict[str, Any] | None) -> None:
    """Count the job's end in this process's run of own failures (a handed-over output completed)."""
    if _state.streak is not None:
        _state.streak.ended(status, error)


def _write_pending_forever(pending: PendingTerminals, store: DriverStore, interval_s: float) -> None:
    """Write kept terminal entries as they become due, for the life of the pool process.

    In a thread of its own, not after jobs: a handed-over output's fallback
    (``workers/generation.py``) must be written when its gateway died, also
    when no further job comes; and an entry the database refused is written
    once it takes writes again. The gateways' retry loops do the same; the
    database's unique terminal constraint settles who wins. One look (an HLEN when none is kept) every
    ``interval_s`` (``GOVGATE_TERMINAL_RETRY_INTERVAL_S``).
    """
    while True:
        time.sleep(interval_s)
        try:
            if pending.count():
                pending.write_all(store)
        except Exception:  # noqa: BLE001 - a failed round must not end the retries
            log.exception("writing kept terminal entries failed; retrying")
