"""The solo pool's time limits (workers/job_limits.py), in this process and in a child that must die."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from workers.job_limits import HARD_LIMIT_EXIT_CODE, JobTimeLimits


def spin(seconds: float) -> None:
    """Busy Python code for ``seconds`` (a handler runs between its bytecodes, as in a generation's loop)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture
def started() -> Iterator[Callable]:
    """Start limits in this process; afterwards the alarm handler and timer are as they were (pytest-timeout's)."""
    handler = signal.getsignal(signal.SIGALRM)
    timer = signal.getitimer(signal.ITIMER_REAL)
    made: list[JobTimeLimits] = []

    def start(soft_s: float, hard_s: float = 30) -> JobTimeLimits:
        limits = JobTimeLimits(soft_s, hard_s)
        limits.start()
        made.append(limits)
        return limits

    yield start
    for limits in made:
        limits.stop()
    assert signal.getsignal(signal.SIGALRM) is handler
    signal.setitimer(signal.ITIMER_REAL, *timer)


def test_the_soft_limit_raises_in_the_job_and_leaves_nothing_armed(started):
    limits = started(0.2)
    began = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        with limits.running():
            spin(20)
    assert 0.15 < time.monotonic() - began < 10
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_a_job_that_ends_in_time_is_not_interrupted_later(started):
    limits = started(0.3)
    with limits.running():
        spin(0.05)
    spin(0.6)  # past the soft limit: nothing fires
    with limits.running():  # and the next job has its own limit
        spin(0.05)


def test_a_job_that_handles_the_soft_limit_is_not_interrupted_twice(started):
    limits = started(0.1)
    with limits.running():
        try:
            spin(20)
        except SoftTimeLimitExceeded:
            spin(0.3)  # recording its own end: no second exception
        else:
            pytest.fail("the soft limit did not fire")


def test_limits_out_of_order_unstarted_or_off_the_main_thread_are_refused():
    with pytest.raises(ValueError):
        JobTimeLimits(0, 1)
    with pytest.raises(ValueError):
        JobTimeLimits(2, 1)
    with pytest.raises(RuntimeError, match="start"):
        with JobTimeLimits(1, 2).running():
            pass
    errors = []

    def in_thread():
        try:
            JobTimeLimits(1, 2).start()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def run_child(script: str) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=60)
    return done, time.monotonic() - began


def test_the_hard_limit_ends_a_job_that_ignores_the_soft_one():
    # A job that swallows the soft limit and goes on (as one stuck in native code would): the process
    # ends at the hard limit, with where it was on stderr and nothing of its data.
    done, elapsed = run_child("""
        import time
        from celery.exceptions import SoftTimeLimitExceeded
        from workers.job_limits import JobTimeLimits

        secret = "the prompt " * 3
        limits = JobTimeLimits(0.2, 1.0, watch_interval_s=0.05)
        limits.start()
        with limits.running():
            while True:
                try:
                    time.sleep(0.05)
                except SoftTimeLimitExceeded:
                    print("soft", flush=True)
        print("not reached", flush=True)
    """)
    assert done.returncode == HARD_LIMIT_EXIT_CODE, done
    assert done.stdout.split() == ["soft"]
    assert "hard time limit" in done.stderr and "line" in done.stderr and "the prompt" not in done.stderr
    assert elapsed >= 1.0


def test_the_hard_limit_ends_a_job_stuck_in_native_code():
    # A C call that never returns to Python (ctypes releases the GIL, as for the models' backends):
    # no handler runs in the main thread, the watchdog still ends the process.
    done, _ = run_child("""
        import ctypes, signal
        from workers.job_limits import JobTimeLimits

        limits = JobTimeLimits(0.2, 0.5, watch_interval_s=0.05)
        limits.start()
        with limits.running():
            # the alarm must not interrupt the call (as it would not interrupt a busy loop in C)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            ctypes.CDLL(None).sleep(30)
        print("not reached", flush=True)
    """)
    assert done.returncode == HARD_LIMIT_EXIT_CODE, done
    assert "not reached" not in done.stdout
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]  # what `govgate up` shows of it
    assert last.startswith("govgate worker: a job outlived its hard time limit (0.5s)"), last


def test_jobs_within_their_limits_never_end_the_process():
    done, _ = run_child("""
        import time
        from workers.job_limits import JobTimeLimits

        limits = JobTimeLimits(0.3, 0.4, watch_interval_s=0.02)
        limits.start()
        for _ in range(5):
            with limits.running():
                time.sleep(0.1)
            time.sleep(0.5)  # idle between jobs for longer than the hard limit
        print("done", flush=True)
    """)
    assert done.returncode == 0, done
    assert done.stdout.split() == ["done"]
