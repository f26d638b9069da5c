"""What every bench script needs to run a private govgate: folders, children, signals, the stack.

Everything started here listens on loopback or a unix socket under a short
temporary folder and is stopped at the end, also on Ctrl-C, SIGTERM or an
error; children get SIGTERM if the bench is killed outright
(``PR_SET_PDEATHSIG``). Ports come from :func:`govgate.processes.free_port`
and OPA from :class:`govgate.opa_server.OpaServer`, as in the test fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from govgate.processes import child_preexec, free_port

__all__ = [
    "BENCH_PRINCIPAL",
    "BENCH_TEAM",
    "HEALTH_PATH",
    "HOST",
    "LOG_LEVEL",
    "ROOT",
    "Running",
    "TempDir",
    "bench_policy_dir",
    "create_admin_key",
    "forget_govgate_environment",
    "free_port",
    "in_temp_dir",
    "log_tails",
    "run_interruptible",
    "say",
    "signals_deferred",
    "spawn",
    "start_govgate",
    "stop_later",
]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
HEALTH_PATH = "/healthz"
#: uvicorn log level of every server a bench starts.
LOG_LEVEL = "INFO"
#: The principal and team of the bench's admin key; its policy copy gives them no usage limits.
BENCH_PRINCIPAL = "bench"
BENCH_TEAM = "bench"

T = TypeVar("T")


def say(line: str) -> None:
    """Progress and problems go to stderr; stdout holds only the figures."""
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- folders and environment


@dataclass
class TempDir:
    """A short folder under /tmp (unix socket paths are limited to ~100 bytes)."""

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ggb-", dir="/tmp")))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def forget_govgate_environment() -> None:
    """Drop inherited GOVGATE_* variables: a bench measures its own processes only.

    A developer's shell pointing at another Redis or registry would otherwise
    leak into the settings the bench builds.
    """
    for name in [n for n in os.environ if n.startswith("GOVGATE_")]:
        del os.environ[name]


def log_tails(var_dir: Path, lines: int = 15) -> Iterator[str]:
    """The end of each child's log, shown when a start fails (the folder is removed after)."""
    for log in sorted(var_dir.rglob("*.log")):  # a bench with two stacks keeps each in a folder of its own
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        yield f"--- {log.relative_to(var_dir)} (last {len(tail)} lines)"
        yield from tail


def in_temp_dir(measure: Callable[[Path], T], errors: tuple[type[BaseException], ...]) -> T | None:
    """``measure(folder)`` in a fresh temporary folder, GOVGATE_* forgotten.

    On one of ``errors`` (a part that did not start, a stuck phase) it says
    what happened and the end of every child's log, and gives None.
    """
    forget_govgate_environment()
    with TempDir() as var_dir:
        try:
            return measure(var_dir)
        except errors as exc:
            say(f"bench: {type(exc).__name__}: {exc}")
            for line in log_tails(var_dir):
                say(line)
            return None


def bench_policy_dir(var_dir: Path) -> Path:
    """The shipped policy with the bench principal and team given no usage limits.

    The shipped defaults (e.g. 120 requests a minute) would turn a load test
    into a measurement of 429s; an operator would give a load-test principal
    its own limits entry the same way.
    """
    target = var_dir / "policies"
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("*_test.rego"))
    data_file = target / "data.json"
    document = json.loads(data_file.read_text())
    limits = document["govgate_config"].setdefault("limits", {})
    limits.setdefault("principals", {})[BENCH_PRINCIPAL] = {}
    limits.setdefault("teams", {})[BENCH_TEAM] = {}
    data_file.write_text(json.dumps(document, indent=2))
    return target


def create_admin_key(settings: Any, note: str) -> str:
    """A new admin key for the bench principal in ``settings``' database; its secret."""
    from gateway.auth import KeyStore
    from gateway.components import open_database

    engine = open_database(settings)
    try:
        return KeyStore(engine).create(BENCH_PRINCIPAL, team=BENCH_TEAM, roles=["admin"], note=note).secret
    finally:
        engine.dispose()


# ---------------------------------------------------------------- children and signals


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python args`` in its own session (Ctrl-C reaches only us; we stop it in order)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=child_preexec())


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM while stopping children, then act on it.

    A second Ctrl-C must not cut a stop short (and leave a child running), but
    it must not be lost either: the run ends once the stop is done.
    """
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def stop_later(stack: contextlib.ExitStack, stop: Callable[[], None]) -> None:
    """Register a stop that a Ctrl-C cannot interrupt halfway."""
    def deferred() -> None:
        with signals_deferred():
            stop()

    stack.callback(deferred)


def run_interruptible(run: Callable[[], int], name: str = "bench") -> int:
    """``run()`` with SIGTERM handled as Ctrl-C: either ends it with 130 once everything is stopped."""
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        return run()
    except KeyboardInterrupt:
        say(f"{name}: interrupted; everything it started has been stopped")
        return 130


# ---------------------------------------------------------------- the stack


@dataclass
class Running:
    """A started stack: where to send, with which key, and its processes (for CPU probes)."""

    base_url: str
    headers: dict[str, str]
    stack: Any  # govgate.supervisor.Stack

    def stop(self) -> None:
        with signals_deferred():
            self.stack.stop()


def start_govgate(var_dir: Path, models: list[str], *, note: str, **settings: Any) -> Running:
    """Redis, one worker per model, ``govgate serve`` and an admin key; stopped again if any step fails.

    ``settings`` are further :class:`gateway.settings.Settings` fields (a
    registry file, a request timeout); the children get them all through
    ``child_env``, as ``govgate up`` passes them.
    """
    from gateway.settings import Settings
    from govgate.redis_server import RedisProcess
    from govgate.stack import Stack, wait_for_api, wait_for_workers
    from govgate.supervisor import child_env

    stack = Stack()
    try:
        stack.redis = RedisProcess.start(var_dir / "redis", persist=False)
        config = Settings(var_dir=var_dir, redis_url=stack.redis.url, policy_dir=bench_policy_dir(var_dir),
                          host=HOST, port=free_port(HOST), log_level=LOG_LEVEL, **settings)
        headers = {"Authorization": f"Bearer {create_admin_key(config, note)}"}
        env = child_env(config, stack.redis.url)
        for name in models:
            stack.workers[name] = spawn(["-m", "govgate.cli", "worker", "--model", name], env,
                                        var_dir / f"worker-{name}.log")
        wait_for_workers(stack.redis.url, models, stack, timeout_s=120)
        stack.api = spawn(["-m", "govgate.cli", "serve"], env, var_dir / "serve.log")
        base_url = f"http://{HOST}:{config.port}"
        wait_for_api(base_url + HEALTH_PATH, stack)
    except BaseException:
        with signals_deferred():
            stack.stop()
        raise
    return Running(base_url=base_url, headers=headers, stack=stack)
