"""Readying the audit store before a worker consumes: migrate, then write kept terminal entries.

Runs in a short-lived child forked by :func:`workers.runtime.run_worker`
before Celery starts, so that the schema exists before the first append
while what only the start needs stays out of the worker: under prefork the
main process never imports SQLAlchemy, SQLModel or Alembic (its pool
processes load what they need after fork); under solo, where the jobs run
in the main process, it loads the audit store for them, and Alembic still
only here (and only when a migration is due: ``audit.migration_heads``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine

    from audit.driver_plan import DriverPlan

    from workers.contract.pending_terminals import PendingTerminals
    from workers.contract.sealing import Sealer
    from workers.runtime import WorkerConfig

log = logging.getLogger(__name__)

#: Exit code of the child when the store cannot be readied (its reason is logged).
EXIT_AUDIT_ERROR = 3


def pending_terminals(client: redis.Redis, config: WorkerConfig, sealer: Sealer) -> PendingTerminals:
    """The store of terminal entries waiting for the database; they hold output, so they are sealed."""
    from workers.contract.pending_terminals import PendingTerminals

    return PendingTerminals(client, horizon_s=config.terminal_retry_horizon_s, seal=sealer.seal,
                            unseal=sealer.unseal)


def migrate_when_writable(engine: Engine, parent_pid: int | None = None) -> None:
    """Migrate, waiting as long as the database is locked instead of failing the start.

    Stops waiting (SystemExit) once ``parent_pid`` is no longer its parent:
    the worker it readies the store for was stopped meanwhile.
    """
    from audit import AuditError, migrate

    while True:
        try:
            migrate(engine)
            return
        except AuditError as exc:
            # SQLite: "database is locked" / "busy"; PostgreSQL: "canceling statement due to lock timeout".
            if not any(word in str(exc) for word in ("locked", "busy", "lock timeout")):
                raise
            log.warning("the audit database is locked (%s); waiting for it before serving", exc)
            time.sleep(1.0)
            if parent_pid is not None and os.getppid() != parent_pid:
                raise SystemExit("the worker stopped while waiting for the audit database") from None


def ready_store(config: WorkerConfig, parent_pid: int | None = None) -> DriverPlan:
    """Migrate the audit schema and write the terminal entries kept while the database was down.

    Returns what the worker appends with (:class:`audit.driver_plan.DriverPlan`):
    the statements compiled here, where SQLAlchemy is loaded anyway, so the
    worker's own process never loads it.
    """
    import redis

    from audit import AuditStore, make_engine
    from audit.append_plan import driver_plan
    from workers.contract.sealing import Sealer, load_or_create_key

    engine = make_engine(config.database_url, busy_timeout_s=config.database_busy_timeout_s)
    try:
        migrate_when_writable(engine, parent_pid)
        client = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:  # terminal entries kept while the database was unwritable
            sealer = Sealer(load_or_create_key(config.payload_key_file))
            pending_terminals(client, config, sealer).write_all(AuditStore(engine))
        finally:
            client.close()
        return driver_plan(engine)
    finally:
        engine.dispose()


class StorePrep:
    """:func:`ready_store` running in a forked child; :meth:`wait` for it before consuming.

    A fork, not a new interpreter: nothing is imported twice, and the child
    logs to the worker's own log. What the child imports leaves with it.
    Started first, it runs while the main process starts Celery (two cores
    do both at once), and the main process waits for it just before its
    pool processes fork (:func:`workers.runtime.build_worker_app`).
    """

    def __init__(self, pid: int, plan_pipe: int) -> None:
        self.pid = pid
        self.exit_code: int | None = None
        self._pipe = plan_pipe  # the read end: the child writes the plan, then exits
        self._plan_text = ""

    @classmethod
    def start(cls, config: WorkerConfig) -> "StorePrep":
        parent = os.getpid()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns (coverage cannot follow it)
            os.close(read_end)
            _child_main(config, parent, write_end)
        os.close(write_end)
        return cls(pid, read_end)

    def wait(self) -> str:
        """Block until the child is done and return its plan (:class:`audit.driver_plan.DriverPlan` as JSON,
        read where the jobs run: a prefork main process imports nothing of the store); SystemExit if the
        child could not ready the store (it logged why)."""
        if self.exit_code is None:
            chunks = []
            with os.fdopen(self._pipe, "rb") as pipe:  # EOF when the child exits (or dies)
                while chunk := pipe.read(65536):
                    chunks.append(chunk)
            _, status = os.waitpid(self.pid, 0)
            self.exit_code = os.waitstatus_to_exitcode(status)
            self._plan_text = b"".join(chunks).decode("utf-8")
        if self.exit_code != 0:
            raise SystemExit(f"the audit store could not be readied (exit code {self.exit_code}); "
                             "see the log above")
        return self._plan_text


def _child_main(config: WorkerConfig, parent: int, plan_pipe: int) -> None:
    code = 1
    try:
        plan = ready_store(config, parent)
        with os.fdopen(plan_pipe, "wb") as pipe:
            pipe.write(plan.to_json().encode("utf-8"))
        code = 0
    except SystemExit as exc:
        log.warning("%s", exc)
    except Exception as exc:  # noqa: BLE001 - logged here; the exit code tells the parent
        from audit import AuditError

        if isinstance(exc, AuditError):
            log.error("cannot ready the audit store: %s", exc)
            code = EXIT_AUDIT_ERROR
        else:
            log.exception("readying the audit store failed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
