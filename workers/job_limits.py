"""Time limits for a job that runs in the worker's own process (``GOVGATE_WORKER_POOL=solo``).

Celery enforces task time limits only where a parent watches a child: in the
prefork pool the worker's main process signals its pool process at the soft
limit and kills it at the hard one. Celery's solo pool runs the job in the
main process and applies neither (its pool reports no timeouts), so without
these a generation that never ends would hold its model's worker for good.

- **Soft limit**: a one-shot ``SIGALRM`` (``setitimer``) whose handler raises
  Celery's ``SoftTimeLimitExceeded`` in the job, as prefork's ``SIGUSR1``
  does in its pool process; the job records its own ``timed_out`` entry
  (``workers/generation.py``), partial output kept. The job runs in the main
  thread (the solo pool calls it from the event loop), the only thread a
  Python signal handler runs in.
- **Hard limit** (soft + ``HARD_LIMIT_GRACE_S``, as Celery's): a watchdog
  thread that looks at the running job's deadline about once a second and,
  past it, writes where each thread was (file, line and function names
  only: no values, nothing of a prompt) to stderr, the worker's log, and
  ends the whole process with :data:`HARD_LIMIT_EXIT_CODE`. A thread can
  do that while the main thread is inside a generation: both backends call
  the model through ctypes, which releases the GIL for the call. The job is
  left unacknowledged in Redis: the broker hands it out again after its
  visibility timeout, and that run finds the request already ended or ends
  it itself (``workers/generation.py``, the redelivery path); ``govgate up``
  restarts the worker.

The handler is installed and the thread started once per worker
(:meth:`JobTimeLimits.start`); a job only arms and disarms them
(:meth:`JobTimeLimits.running`: two ``setitimer`` calls and two stores, a
few µs). faulthandler's ``dump_traceback_later(exit=True)`` would not need
the GIL at all, but it starts and joins a thread for every job: 0.1 ms of
wall time on the hand-over between two jobs, measured, which this pool is
chosen to shorten.

A signal that arrives as the job returns may still raise in the ``finally``
that disarms it (Python runs handlers between bytecodes); the job's work is
done by then and Celery only logs the task as failed. Prefork's ``SIGUSR1``
has the same window.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

#: Where the hard limit writes what each thread was doing: the process's stderr (the worker's log). The
#: descriptor, not ``sys.stderr``: Celery replaces that with a logging proxy that has no file behind it.
STDERR_FD = 2
#: The worker's exit code when a job outlived its hard limit (``EX_SOFTWARE``: the job, not the machine).
HARD_LIMIT_EXIT_CODE = 70
#: How often the watchdog looks at the running job's deadline (the hard limit's precision).
WATCH_INTERVAL_S = 1.0


class JobTimeLimits:
    """A soft and a hard limit for each job run in the main thread of this process."""

    def __init__(self, soft_s: float, hard_s: float, *, watch_interval_s: float = WATCH_INTERVAL_S) -> None:
        if not 0 < soft_s <= hard_s:
            raise ValueError(f"time limits must satisfy 0 < soft ({soft_s}) <= hard ({hard_s})")
        self.soft_s, self.hard_s, self.watch_interval_s = soft_s, hard_s, watch_interval_s
        self._armed = False
        #: monotonic time past which the running job ends the process; None between jobs
        self._deadline: float | None = None
        self._previous_handler: Any = None
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Install the alarm handler and start the watchdog (once, in the main thread, before any job)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("in-process time limits need the main thread (SIGALRM is delivered there)")
        if self._watchdog is not None:
            return
        self._previous_handler = signal.signal(signal.SIGALRM, self._on_soft_limit)
        self._stopped.clear()
        self._watchdog = threading.Thread(target=self._watch, name="govgate-hard-time-limit", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        """Put the previous alarm handler back and end the watchdog (tests; a worker just exits)."""
        if self._watchdog is None:
            return
        self._stopped.set()
        self._watchdog.join()
        self._watchdog = None
        signal.signal(signal.SIGALRM, self._previous_handler)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Within the block, the soft limit raises ``SoftTimeLimitExceeded``; the hard one ends the process."""
        if self._watchdog is None:
            raise RuntimeError("JobTimeLimits.start() was not called")
        self._deadline = time.monotonic() + self.hard_s
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, self.soft_s)
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._deadline = None

    def _on_soft_limit(self, _signum: int, _frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False  # once: the job's own handling of the limit must not be interrupted again
            raise SoftTimeLimitExceeded(f"soft time limit ({self.soft_s:g}s) exceeded")

    def _watch(self) -> None:
        while not self._stopped.wait(self.watch_interval_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._end_process()

    def _end_process(self) -> None:
        said = (f"govgate worker: a job outlived its hard time limit ({self.hard_s:g}s); ending the worker "
                f"(exit code {HARD_LIMIT_EXIT_CODE})")
        os.write(STDERR_FD, f"{said}. Where each thread was:\n".encode())
        faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
        # Again after the dump: `govgate up` reports a worker's exit with its log's last line, which was a frame.
        os.write(STDERR_FD, f"{said}.\n".encode())
        os._exit(HARD_LIMIT_EXIT_CODE)
