"""``govgate up``'s supervisor: readiness from Redis, the database step in a child.

That the supervisor imports nothing heavy is checked on a real ``govgate up``
in tests/e2e/test_up.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from govgate.processes import stop_process
from govgate.stack import Stack, StartupError
from govgate.supervisor import DatabaseStep, Launcher, child_env
from tests.conftest import ROOT
from workers.contract.jobs import loaded_key

@pytest.fixture
def launcher(settings, tmp_path):
    stack = Stack(logs=tmp_path)
    said: list[str] = []
    launch = Launcher(settings, stack, child_env(settings, settings.redis_url), settings.redis_url, said.append,
                      time.monotonic())
    yield launch, stack
    for proc in stack.workers.values():
        stop_process(proc, timeout_s=5)
    launch.close()


def _stand_in(stack: Stack, name: str) -> subprocess.Popen:
    """A process that stays alive like a worker but never loads anything."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stack.workers[name] = proc
    return proc


def test_a_worker_is_ready_only_once_its_pool_says_the_model_is_loaded(launcher, settings):
    launch, stack = launcher
    proc = _stand_in(stack, "slow-model")
    launch.pending["slow-model"] = time.monotonic()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert launch.poll() == []  # alive, but nothing loaded yet: still pending
        client.set(loaded_key("slow-model", proc.pid + 1), 1, ex=30)  # another worker's key does not count
        assert launch.poll() == [] and "slow-model" in launch.pending
        client.set(loaded_key("slow-model", proc.pid), 1, ex=30)
        assert launch.poll() == ["slow-model"]
        assert launch.pending == {} and launch.poll() == []
    finally:
        client.delete(loaded_key("slow-model", proc.pid), loaded_key("slow-model", proc.pid + 1))
        client.close()


def test_a_worker_that_never_loads_is_reported_by_name(launcher):
    launch, stack = launcher
    _stand_in(stack, "never-loads")
    launch.pending["never-loads"] = time.monotonic() - 10
    with pytest.raises(StartupError, match=r"no worker answered for \['never-loads'\] within 5s"):
        launch.poll(timeout_s=5)


def test_the_database_step_makes_the_admin_key_once(settings, tmp_path):
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'up.db'}")
    env = child_env(own, own.redis_url)
    first = DatabaseStep(env, tmp_path / "database.log")
    secret = first.result()
    assert secret is not None and secret.startswith("gk_")
    assert DatabaseStep(env, tmp_path / "database.log").result() is None  # one admin key, made on the first run
    from gateway.auth import KeyStore
    from gateway.db_setup import open_database

    engine = open_database(own)
    try:
        assert KeyStore(engine).has_role("admin")
    finally:
        engine.dispose()


def test_an_unusable_database_is_one_line_naming_it(settings, tmp_path):
    own = settings.with_(database_url="nosuch://x")
    step = DatabaseStep(child_env(own, own.redis_url), tmp_path / "database.log")
    with pytest.raises(StartupError) as caught:
        step.result()
    message = str(caught.value)
    assert message.startswith(f"the database at {own.effective_database_url} cannot be used: ")
    assert "\n" not in message and "Traceback" not in message


def test_the_database_step_prints_one_json_line(settings, tmp_path):
    """The protocol :class:`DatabaseStep` reads: run as the supervisor runs it."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'cli.db'}")
    result = subprocess.run([sys.executable, "-m", "govgate.admin_key"], env=child_env(own, own.redis_url),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["secret"]
