"""``govgate up``: the embedded default, one command from nothing to serving.

Order of start and stop, and why: docs/architecture.md, "Design notes by
package" (govgate). This process lives as long as the stack but only starts
and watches children, so it imports little: no Celery, no database, no
model library. The database step runs in a child (:mod:`govgate.admin_key`)
and readiness is read from Redis keys the workers write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from govgate.launcher import Launcher, NeverReady, private_log
from govgate.processes import child_preexec
from govgate.redis_server import RedisProcess, RedisUnavailable, ping, url_problem
from govgate.stack import Stack, StartupError
from gateway.stop_timing import stop_deadline_s
from gateway.settings import Settings, without_password
from workers.contract.registry import Registry, RegistryError, load_registry

# Launcher and private_log live in govgate.launcher; named here too, where callers have long found them.
__all__ = ["DatabaseStep", "Launcher", "check_port", "child_env", "private_dir", "private_log", "run_up"]

#: How often the startup loop looks at the API and the workers while the first model comes up.
STARTUP_POLL_S = 0.05
#: How often it looks once govgate is up (later models, children that die).
RUNNING_POLL_S = 0.2
#: How long a stop waits for a running database step, so that an admin key it made is shown, not lost.
DATABASE_STEP_GRACE_S = 10.0


def ensure_keys(settings: Settings) -> None:
    """Create the payload and digest keys now, before the children start, or say why they are unusable.

    Creation is race-free anyway (the children would agree on one key); doing
    it here turns an unusable key file into one line before anything starts.
    """
    from workers.contract.sealing import KeyFileError, load_or_create_key

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


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment of a child process: ours, with every setting spelled out."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GOVGATE_")}
    env.update(settings.with_(redis_url=redis_url).to_env())
    return env


def check_addresses(settings: Settings) -> None:
    """Refuse an OPA or Redis URL that cannot be read before anything starts: the API's own check found a
    malformed OPA URL only after Redis, a worker and the 253 MB model were started (probe s56)."""
    from gateway.policy.engine import PolicyLoadError
    from gateway.policy.opa import OpaAddress, shown_opa_url

    if settings.opa_url:
        try:
            OpaAddress.parse(settings.opa_url)
        except PolicyLoadError as exc:
            raise StartupError(f"GOVGATE_OPA_URL={shown_opa_url(settings.opa_url)}: {exc}") from None
    if settings.redis_url:
        check_redis_url(settings.redis_url)


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL redis-py cannot read (``govgate.redis_server.url_problem``), naming the setting."""
    problem = url_problem(url)
    if problem is not None:
        raise StartupError(f"GOVGATE_REDIS_URL={without_password(url)} cannot be read: {problem}")


def check_port(host: str, port: int) -> None:
    """Refuse to start when the API's address is taken, before starting anything.

    Otherwise the API child dies after Redis and the workers are up, and a
    health check may even be answered by whatever holds the port. The probe
    sets SO_REUSEADDR as uvicorn does, so a port in TIME_WAIT counts as free.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use: set GOVGATE_PORT to a free port "
                                   "(or stop what listens there)") from None
            raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                               "check GOVGATE_HOST and GOVGATE_PORT") from None


def command_hint() -> str:
    """How the user should run ``govgate`` from here: the venv's script, relative when under the cwd."""
    script = Path(sys.executable).parent / "govgate"  # not resolved: a venv's python is a symlink
    if not script.exists():
        found = shutil.which("govgate")
        return "govgate" if found else f"{sys.executable} -m govgate.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


class DatabaseStep:
    """:mod:`govgate.admin_key` in a child: the schema and an admin key, without this process importing them.

    Started once the API and the first model answer, and not waited for
    before saying so: the API migrates both schemas on its own start, so by
    then the child only finds them current, and it does not compete for the
    CPU with the API and the first worker while they import (on two cores it
    delayed the first answer by seconds). Its lines follow the banner.
    """

    def __init__(self, env: dict[str, str], log: Path) -> None:
        with private_log(log) as errors:
            self.process = subprocess.Popen([sys.executable, "-m", "govgate.admin_key"], env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                            text=True, start_new_session=True, preexec_fn=child_preexec())
        self.log = log

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> str | None:
        """The admin key's secret if made now, None if one existed; ``StartupError`` if the database is unusable."""
        out, _ = self.process.communicate()
        lines = out.strip().splitlines()
        try:
            reply = json.loads(lines[-1]) if lines else {}
        except ValueError:
            reply = {}
        if "error" in reply:
            raise StartupError(reply["error"])
        if self.process.returncode != 0 or "secret" not in reply:
            raise StartupError(f"preparing the database failed with code {self.process.returncode} (see {self.log})")
        return reply["secret"]

    def stop(self) -> None:
        from govgate.processes import stop_process

        stop_process(self.process, timeout_s=10)


def run_up(settings: Settings, out: TextIO = sys.stdout, started: float | None = None) -> int:
    """Run the embedded default until interrupted; returns the exit code.

    ``started`` is the ``time.monotonic()`` the command began at (for the
    time-to-ready it prints); by default, now.
    """
    from govgate.model_files import ensure_models, start_order
    from workers.backends import BackendError

    started = time.monotonic() if started is None else started

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    stopping = False
    stack = Stack(api_stop_s=stop_deadline_s(settings), drain_s=settings.drain_s)

    def on_signal(signum: int, _frame: object) -> None:
        """Ctrl-C or SIGTERM: stop; again once stopping: cut the API's drain short (``Stack.stop``)."""
        nonlocal stopping
        if stopping or stack.stopping:
            stack.hurry(signum)
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    launcher: Launcher | None = None
    database: DatabaseStep | None = None
    try:
        check_port(settings.host, settings.port)
        check_addresses(settings)
        registry = load_registry(settings.models_file, settings.var_dir)
        private_dir(settings.var_dir)
        say(f"govgate: starting the embedded default in {settings.var_dir}")
        ensure_keys(settings)  # before any child starts: they all read the same key files
        if settings.redis_url:
            if not ping(settings.redis_url):
                raise StartupError(f"GOVGATE_REDIS_URL={without_password(settings.redis_url)} does not answer")
            redis_url = settings.redis_url
            say(f"  redis: {without_password(redis_url)} (given)")
        else:
            stack.redis = RedisProcess.start(settings.var_dir / "redis")
            redis_url = stack.redis.url
            say(f"  redis: started {stack.redis.process.args[0]} on {stack.redis.socket_path}")

        order = start_order(registry)
        if not order:
            raise StartupError("the model registry is empty: add a model (see GOVGATE_MODELS_FILE)")
        first, *later = order
        ensure_models(Registry({first: registry.models[first]}), say)
        stack.logs = private_dir(settings.var_dir / "logs")
        env = child_env(settings, redis_url)
        launcher = Launcher(settings, stack, env, redis_url, say, started)
        launcher.start_api()
        launcher.start_worker(first)
        # While they boot: the other models' files (assembling one takes seconds on a cold start).
        ensure_models(Registry({name: registry.models[name] for name in later}), say)
        while not stopping and not (launcher.api_ready and first in launcher.ever_ready):
            try:
                launcher.poll()
            except NeverReady as failed:
                first = _next_first(launcher, failed, later)
            time.sleep(STARTUP_POLL_S)
        if not stopping:
            launcher.serving = True
            _banner(settings, first, later, sorted(launcher.given_up), launcher.elapsed(), say)
            database = DatabaseStep(env, stack.logs / "database.log")
            for name in later:
                launcher.start_later(name)
        keys_told = False
        while not stopping:
            for name in launcher.poll():
                say(f"  model {name}: ready after {launcher.elapsed():.1f}s")
            if not keys_told and database is not None and database.done():
                _keys(settings, database.result(), say)
                keys_told = True
            time.sleep(RUNNING_POLL_S if keys_told else STARTUP_POLL_S)
        if not keys_told and database is not None:
            _finish_database_step(database, settings, say)
        say("govgate: stopping …")
        return 0
    except (StartupError, RedisUnavailable, RegistryError, BackendError, OSError) as exc:
        # once up, a child that died stops a running stack: it did start
        say(f"govgate: {'stopping' if launcher is not None and launcher.serving else 'cannot start'}: {exc}")
        return 1
    finally:
        if database is not None:
            database.stop()
        if launcher is not None:
            launcher.close()
        stack.stop(say)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        say("govgate: stopped")


def _next_first(launcher: Launcher, failed: NeverReady, later: list[str]) -> str:
    """The first model's worker died before its model was ready: give that model up and start the next
    cheapest (taken out of ``later``), so one broken model does not keep the others from serving.

    With none left, no model can be served and ``up`` stops: :class:`NeverReady` names the last reason
    (the earlier models' reasons are on their give-up lines above it).
    """
    if not later:
        if launcher.given_up:
            raise StartupError(f"{failed}; no model could be loaded (given up before it: "
                               f"{', '.join(sorted(launcher.given_up))})")
        raise failed
    launcher.give_up_unloaded(failed)
    first = later.pop(0)
    launcher.start_worker(first)
    return first


def _finish_database_step(database: DatabaseStep, settings: Settings, say: Callable[[str], None]) -> None:
    """A stop asked for while the database step runs: let it end (bounded) and show the admin key it made.

    Stopping it instead could kill it after its transaction committed the
    admin key and before its secret was read: the key would exist, shown
    nowhere, and every later run would say it was made on an earlier run.
    """
    try:
        database.process.wait(timeout=DATABASE_STEP_GRACE_S)
    except subprocess.TimeoutExpired:
        return
    try:
        _keys(settings, database.result(), say)
    except StartupError as exc:
        say(f"govgate: {exc}")


def _banner(settings: Settings, first: str, later: list[str], given_up: list[str], elapsed_s: float,
            say: Callable[[str], None]) -> None:
    base = f"http://{settings.host}:{settings.port}"
    say("")
    say(f"govgate is up after {elapsed_s:.1f}s: OpenAI-compatible API at {base}/v1")
    say(f"  model {first}: ready")
    for name in given_up:
        say(f"  model {name}: given up, its worker could not start (see above; its requests are refused with "
            "model_unavailable if the worker could not load it)")
    for name in later:
        say(f"  model {name}: starting now (its requests wait in its queue until it is ready)")
    say(f'  try:  curl -H "Authorization: Bearer <key>" {base}/v1/chat/completions \\')
    say(f'          -d \'{{"model": "{first}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'')
    say("  Ctrl-C stops everything.")


def _keys(settings: Settings, admin_secret: str | None, say: Callable[[str], None]) -> None:
    """The admin key lines, once the database step is done (a moment after the banner)."""
    govgate = command_hint()
    say(f"  audit store: {without_password(settings.effective_database_url)}")
    if admin_secret:
        say(f"  admin API key (shown once, keep it): {admin_secret}")
    else:
        say("  admin API key: made on an earlier run; secrets are never shown again. Make another with:")
        say(f"    {govgate} keys create --user admin --role admin")
    say(f"  create a user key:  {govgate} keys create --user alice --team research --role analyst")
