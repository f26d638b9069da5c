"""The hard timeout (``tests/hard_timeout.py``) ends a test stuck in C code holding the GIL, which
pytest-timeout's signal cannot reach: the run goes on with the next test and says which one hung."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.hard_timeout import LIMIT_ENV

ROOT = Path(__file__).resolve().parent.parent

STUCK = '''
import ctypes


def test_stuck_in_c():
    libc = ctypes.PyDLL(None)  # called with the GIL held
    mutex = ctypes.create_string_buffer(64)  # zeroed: glibc's PTHREAD_MUTEX_INITIALIZER
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # locked again by its owner: never returns


def test_after_it():
    assert True
'''


def test_a_test_stuck_in_c_ends_its_worker_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = {**os.environ, LIMIT_ENV: "3", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", "-p", "tests.hard_timeout", "--timeout", "1",
                          "-n", "1", "-p", "xdist", str(tmp_path / "test_stuck.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output  # failed, not hung (pytest-timeout's 1 s could not end it)
    assert "Timeout (0:00:03)!" in output and "test_stuck_in_c" in output, output  # every thread's stack
    assert "crashed while running" in output and "test_stuck_in_c" in output, output
    assert "1 failed, 1 passed" in output, output  # the run went on with a fresh worker
