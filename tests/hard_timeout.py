"""A pytest plugin: a test still running well past its timeout ends its test process, whatever holds it.

pytest-timeout (``timeout`` in pyproject.toml, the ``signal`` method) raises
in the test's main thread from a Python signal handler, which runs only when
the interpreter gets control back. A test stuck in C code that never
returns (session 48: llama.cpp's server destructor waiting for a task loop
that never started) held its xdist worker until CI's own limit, with no word
of which test it was. The ``thread`` method would not help either: its
thread needs the GIL that such C code may hold.

Here each test arms :func:`faulthandler.dump_traceback_later` with
``exit=True``: CPython's watchdog is a C thread that takes no GIL, so after
the test's timeout plus :data:`GRACE_S` it writes every thread's stack to
the process's stderr and ends the process (exit code 1). Under xdist the
controller reports the worker crashed while running that test, fails it,
and goes on with a fresh worker; without xdist the run ends there. Load it
with ``-p tests.hard_timeout`` (pyproject's ``addopts``).
"""

from __future__ import annotations

import faulthandler
import os
from typing import Iterator

import pytest

#: How long past its own timeout a test may run before its process is ended.
GRACE_S = 120.0
#: Overrides the whole limit in seconds (this plugin's own test sets it low).
LIMIT_ENV = "GOVGATE_TEST_HARD_LIMIT_S"


#: The real stderr, kept from before pytest's capture points fd 2 at a temporary file (which dies
#: with the process): the watchdog's stacks must outlive it.
_STDERR = os.fdopen(os.dup(2), "w")


def hard_limit_s(item: pytest.Item) -> float | None:
    """The seconds after which ``item``'s process is ended, or None when the test has no timeout."""
    override = os.environ.get(LIMIT_ENV, "").strip()
    if override:
        return float(override)
    chosen = item.config.getoption("timeout", None)  # pytest-timeout's --timeout, if given
    if chosen is not None:
        return float(chosen) + GRACE_S if float(chosen) > 0 else None
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        timeout = marker.args[0] if marker.args else marker.kwargs["timeout"]
    else:
        try:
            timeout = item.config.getini("timeout")
        except ValueError:  # pytest-timeout not installed: no "timeout" ini key
            return None
    try:
        seconds = float(timeout) if timeout not in (None, "") else 0.0
    except (TypeError, ValueError):
        return None
    return seconds + GRACE_S if seconds > 0 else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = hard_limit_s(item)
    if limit is not None:
        faulthandler.dump_traceback_later(limit, exit=True, file=_STDERR)
    try:
        yield
    finally:
        if limit is not None:
            faulthandler.cancel_dump_traceback_later()
