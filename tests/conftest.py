"""Fixtures that start the real parts: Redis, a Celery worker process, the app.

Everything listens on loopback or a unix socket under one short temporary
folder (unix socket paths are limited to ~100 bytes, so pytest's long
tmp_path is not used for Redis). Session-scoped where starting is costly;
tests that break a part get their own copy of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator

import kombu.exceptions
import pytest
import redis
from litestar.testing import AsyncTestClient

from audit import AuditStore, make_engine, migrate
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.processes import child_preexec, free_port, stop_process
from govgate.redis_server import RedisProcess
from gateway.settings import Settings
from govgate.supervisor import child_env
from workers.contract.celery_config import make_celery
from workers.contract.registry import TINY_MODEL_NAME
from tests.conftest_models import tiny_model_path, tiny_spec  # noqa: F401  (shared fixtures)
from tests.opa_fixtures import opa_binary, opa_log_dir, opa_policy_server, opa_server, start_opa  # noqa: F401
from tests.postgres_server import REQUIRE_ENV as REQUIRE_POSTGRES_ENV
from tests.postgres_server import PostgresServer, PostgresUnavailable

ROOT = Path(__file__).resolve().parent.parent
#: Run the suite's gateways in this queue mode (``fair``, the default, or ``fifo``).
QUEUE_MODE_ENV = "GOVGATE_TEST_QUEUE_MODE"
#: A model in the test registry that no worker serves (timeouts, expiry).
IDLE_MODEL = "idle-tiny"
#: Another unserved model, kept for the queue-admission test alone (its queue only fills there).
QUEUE_MODEL = "queue-tiny"
#: Models served only by the crash-safety tests' own workers.
CRASH_MODEL = "crash-tiny"
LIMITED_MODEL = "limited-tiny"
RESCUE_MODEL = "rescue-tiny"
PRIORITY_MODEL = "priority-tiny"
#: Served only by the PostgreSQL end-to-end tests' own workers (tests/e2e/test_postgres_gateway.py, test_postgres_frozen.py).
POSTGRES_MODEL = "postgres-tiny"
#: Served only by the output rules' end-to-end tests' own workers (tests/e2e/test_output_rules.py);
#: the second one by a worker started after its gateway died.
OUTPUT_MODEL = "output-tiny"
ORPHAN_MODEL = "orphan-tiny"
#: Served only by the solo pool's tests' own worker (tests/e2e/test_solo_pool.py).
SOLO_MODEL = "solo-tiny"
#: Served only by the timeout-charging tests' own worker (tests/e2e/test_timeout_charges.py), which they freeze.
TIMEOUT_MODEL = "timeout-tiny"


#: A test starting this close before 00:00 UTC waits for the new day first (see :func:`clear_of_midnight`).
MIDNIGHT_MARGIN_S = 120.0


@pytest.fixture(autouse=True)
def clear_of_midnight() -> None:
    """Start no test in the last minutes of a UTC day: wait for the next day instead.

    The usage counters' day and month roll over at 00:00 UTC (the gateway's
    clock), so a test that charges a request and then reads ``tokens_today``
    or ``tokens_this_month`` read 0 when the two fell on either side of
    midnight (a ``make test`` run across it failed that way). Waiting costs a
    run across midnight at most this margin per test process, and nothing
    otherwise.
    """
    now = time.time()
    to_midnight = 86400.0 - now % 86400.0
    if to_midnight < MIDNIGHT_MARGIN_S:
        time.sleep(to_midnight + 1.0)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def var_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Callable[[str], Path]]:
    """Make short-path folders (for unix sockets) named ``<prefix>…``; all removed when the test ends."""
    made: list[Path] = []

    def make(prefix: str = "gg-") -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=prefix)))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(var_dir: Path) -> Iterator[RedisProcess]:
    """A real Redis, resolved exactly as ``govgate up`` resolves it."""
    server = RedisProcess.start(var_dir / "redis", persist=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL on loopback for the session (tests/postgres_server.py).

    Skips the tests that need it when there is no PostgreSQL, or fails them
    when ``GOVGATE_TEST_REQUIRE_POSTGRES=1`` (CI), so CI cannot pass by skipping.
    """
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{exc}; {REQUIRE_POSTGRES_ENV}=1 requires PostgreSQL")
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def models_file(var_dir: Path) -> Path:
    """The test registry: the built-in tiny model under several names, each with its own queue."""
    path = var_dir / "models.toml"
    model = var_dir / "models" / "govgate-tiny-llama.gguf"
    names = [TINY_MODEL_NAME, IDLE_MODEL, QUEUE_MODEL, CRASH_MODEL, LIMITED_MODEL, RESCUE_MODEL, PRIORITY_MODEL,
             POSTGRES_MODEL, OUTPUT_MODEL, ORPHAN_MODEL, SOLO_MODEL, TIMEOUT_MODEL]
    path.write_text("\n".join(
        f'[models.{name}]\npath = "{model}"\ngenerate = "tiny-llama"\ncontext_length = 4096\n'
        f'family = "llama"\ntags = ["tiny"]\n' for name in names))
    return path


def policy_copy(folder: Path, change: Callable[[dict], None] | None = None) -> Path:
    """A copy of the shipped ``policies/`` whose ``govgate_config`` data ``change`` may edit."""
    target = folder / "policies"
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("*_test.rego"))
    if change is not None:
        data_file = target / "data.json"
        document = json.loads(data_file.read_text())
        change(document["govgate_config"])
        data_file.write_text(json.dumps(document, indent=2))
    return target


def _roomy_limits(config: dict) -> None:
    """The suite sends hundreds of requests a minute as a few principals: lift the shipped limits."""
    roomy = {"requests_per_minute": 100000, "tokens_per_minute": 10**9, "tokens_per_day": 10**10,
             "tokens_per_month": None, "in_flight": 1000}
    config["limits"] = {"principals": {"default": roomy}, "teams": {"default": roomy}}


@pytest.fixture(scope="session")
def settings(var_dir: Path, redis_server: RedisProcess, models_file: Path) -> Settings:
    """The suite's settings: the shipped policy with limits lifted (limit tests set their own)."""
    return Settings(var_dir=var_dir, redis_url=redis_server.url, policy_dir=policy_copy(var_dir, _roomy_limits),
                    models_file=str(models_file), request_timeout_s=60.0, port=free_port(),
                    queue_mode=os.environ.get(QUEUE_MODE_ENV, Settings.queue_mode))


def spawn_cli(settings: Settings, *args: str, log: Path | None = None) -> subprocess.Popen:
    """Run ``govgate <args>`` as a real child process configured by ``settings``."""
    env = child_env(settings, settings.redis_url)
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "govgate.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, preexec_fn=child_preexec())


def wait_for_worker(redis_url: str, model: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the worker ``process`` (``govgate worker``, serving ``model``) answers a ping.

    The ping names that worker's node (``<model>.<pid>@<host>``, workers/runtime.py) and
    stops at its reply: a ping to all waits its whole timeout for replies that may still come.
    """
    app = make_celery(redis_url)
    node = f"{model}.{process.pid}@{socket.gethostname()}"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"worker for {model} exited with {process.returncode}"
            try:
                replies = app.control.ping(destination=[node], timeout=0.5, limit=1) or []
            except (OSError, redis.RedisError, kombu.exceptions.KombuError):
                time.sleep(0.2)  # Redis is (re)starting
                continue
            if any(node in reply for reply in replies):
                return
        raise TimeoutError(f"worker for {model} did not answer within {timeout_s}s")
    finally:
        app.close()


def served_in_order(log: Path) -> list[str]:
    """The request ids a worker's log says it served, in the order it ended them.

    One worker at concurrency 1 ends its jobs in the order it started them, and Celery's success line
    names each (the task id is the request id). The start reconstructed from an audit entry
    (``bench/_fairness_figures.job_from_entry``) is off by the gateway's delay in recording a handed-over
    output, a few ms on a busy machine: more than the ~2.5 ms between two jobs on the solo pool. A job
    that gave way at its start (``workers/contract/repick.py``) logs that, then Celery's success line of a
    task that ran nothing: not a job served.
    """
    served: list[str] = []
    gave_way: set[str] = set()  # a job that gave way at its start ran nothing; its task still "succeeded"
    for line in re.finditer(r"request ([0-9a-f]+) gave way to a fairer job|Task govgate\.generate\[([0-9a-f]+)\] "
                            r"succeeded", log.read_text()):
        put_back, ended = line.groups()
        if put_back:
            gave_way.add(put_back)
        elif ended in gave_way:
            gave_way.discard(ended)
        else:
            served.append(ended)
    return served


def stop_processes(processes: Iterable[subprocess.Popen], timeout_s: float = 30) -> None:
    """Stop several children at once: SIGTERM to each, then wait for each (killed if still there at the end).

    A Celery worker's warm shutdown spends about 1.5 s stopping its pool;
    one after another (``stop_process`` each) five workers take ~10 s, signalled
    together ~2 s. Each is signalled once: a second SIGTERM would not be the
    shutdown a worker normally gets.
    """
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[subprocess.Popen]:
    """A real Celery worker process serving the tiny model."""
    process = spawn_cli(settings, "worker", "--model", TINY_MODEL_NAME, log=settings.var_dir / "worker.log")
    wait_for_worker(settings.redis_url, TINY_MODEL_NAME, process)
    yield process
    stop_process(process, timeout_s=30)


@pytest.fixture(scope="session")
def keyring(settings: Settings) -> dict[str, str]:
    """API keys for each kind of principal the shipped policy knows."""
    store = KeyStore(open_database(settings))
    keys = {
        "admin": store.create("root", team="ops", roles=["admin"]).secret,
        "analyst": store.create("alice", team="research", roles=["analyst"]).secret,
        "viewer": store.create("victor", team="research", roles=["viewer"]).secret,
        "nobody": store.create("nora", team=None, roles=[]).secret,
    }
    revoked = store.create("rex", team="research", roles=["analyst"])
    store.revoke(revoked.key.key_id)
    keys["revoked"] = revoked.secret
    store.engine.dispose()
    return keys


@pytest.fixture(scope="session")
def audit_store(settings: Settings) -> Iterator[AuditStore]:
    """The session's audit store, migrated (a test that only appends, run alone, found no table)."""
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    yield AuditStore(engine)
    engine.dispose()


@pytest.fixture
async def client(settings: Settings, worker: subprocess.Popen) -> AsyncIterator[AsyncTestClient]:
    """The real app in-process, talking to the real Redis, worker and database."""
    async with AsyncTestClient(create_app(settings), timeout=120) as test_client:
        yield test_client


@pytest.fixture(scope="module")
async def module_client(settings: Settings, worker: subprocess.Popen) -> AsyncIterator[AsyncTestClient]:
    """``client``'s app started once for a whole module (its start, ~0.4 s, is most of a small test's time).

    Only for modules whose tests share nothing through the app's own state:
    they read the audit log by their own request ids or since their own
    ``head()``, use the session's keys unchanged, and break no component.
    Such a module overrides ``client`` with a fixture that returns this one.
    """
    async with AsyncTestClient(create_app(settings), timeout=120) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Served(str):
    """A served gateway's base URL, carrying its process (for signals)."""

    process: subprocess.Popen


@contextlib.contextmanager
def serving(settings: Settings, log: Path) -> Iterator[str]:
    """``govgate serve`` for ``settings`` as a real uvicorn process on a free port; yields its base URL.

    Tests that need requests really in flight at once use this rather than
    Litestar's AsyncTestClient, whose requests run one at a time.
    """
    import httpx

    own = settings.with_(port=free_port())
    process = spawn_cli(own, "serve", log=log)
    base = Served(f"http://{own.host}:{own.port}")
    base.process = process
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, f"govgate serve exited with {process.returncode}; see {log}"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise TimeoutError("govgate serve did not become healthy")
        yield base
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def served_api(settings: Settings, worker: subprocess.Popen) -> Iterator[str]:
    """``govgate serve`` with the suite's settings, shared by the session; yields its base URL."""
    with serving(settings, settings.var_dir / "serve.log") as base:
        yield base
