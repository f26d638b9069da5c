"""``govgate up``'s launcher: it starts the API and the workers, says when each is ready, restarts workers.

Split from :mod:`govgate.supervisor` (which orders the whole start and stop)
so that each holds one job: this module owns the children's processes and
logs while the stack runs; when to restart a worker is
:mod:`govgate.restarts`'s call.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from govgate.processes import child_preexec, stop_process
from govgate.restarts import GiveUp, RestartPolicy
from govgate.stack import Stack, StartupError, api_not_ready, check_alive, exit_reason

if TYPE_CHECKING:
    from gateway.settings import Settings


def private_log(path: Path) -> TextIO:
    """A log file opened for appending, created 0600 (logs name requests and principals)."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", buffering=1)


#: What a model given up means for its requests (a worker that could not load it said so: gateways refuse them).
_UNSERVED = ("requests for {name} are refused with model_unavailable if its worker could not load it, else wait "
             "in its queue until they time out; the rest keeps serving (fix it, then restart govgate up)")


class NeverReady(StartupError):
    """During the start, ``model``'s worker exited before its model was ever ready (``why``: its exit and log).

    The message is the one ``up`` stops with when no other model is left to
    try; :func:`govgate.supervisor.run_up` gives the model up instead when one is.
    """

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"worker {model} {why}")
        self.model, self.why = model, why


class NotStarted(StartupError):
    """A worker's start was refused by something that may pass (Redis refusing a write on a full disk, a
    log that cannot be opened, a fork that failed): nothing of it is left running, and once the stack
    serves the start is tried again later (:meth:`RestartPolicy.not_started`) rather than giving the
    model up, which used to leave it dead after the disk was freed (h9 F2)."""

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"worker for model {model} not started: {why}")
        self.model, self.why = model, why


#: A worker's exit status when it stopped because Redis refused its writes (MISCONF on a full disk,
#: NOREPLICAS, READONLY, OOM: ``workers/contract/redis_refusal.py``): EX_TEMPFAIL. Its model did not crash: once serving
#: the start is tried again after the waits of a refused start (:meth:`RestartPolicy.not_started`), never given
#: up; during the start ``up`` stops (as for a start Redis refuses), giving no model up.
REDIS_REFUSED_EXIT = os.EX_TEMPFAIL

#: What a spawn raises when the command itself cannot be run (the venv replaced under a running ``up``): the
#: model is given up. Anything else (EAGAIN, ENOMEM from fork) may pass and is retried.
_COMMAND_GONE = (FileNotFoundError, PermissionError, NotADirectoryError)


def command_gone(exc: OSError) -> bool:
    """``exc`` from :func:`spawn_govgate` means its command cannot be run any more, not a passing refusal."""
    return isinstance(exc, _COMMAND_GONE) or exc.errno == errno.ENOEXEC


def spawn_govgate(args: list[str], env: dict[str, str], log_file: TextIO | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "govgate.cli", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                            start_new_session=True, preexec_fn=child_preexec())


def _loaded_key(model: str, worker_pid: int) -> str:
    """``workers.contract.jobs.loaded_key`` (imported late: that module pulls in the sealing crypto)."""
    from workers.contract.jobs import loaded_key

    return loaded_key(model, worker_pid)


def _kill_now(proc: subprocess.Popen) -> None:
    """End a worker started a moment ago, and its process group (it loaded nothing, so nothing is lost)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    stop_process(proc, timeout_s=5, sig=signal.SIGKILL)


class Launcher:
    """Starts the API and the workers, and reports each as it becomes ready.

    One loop polls the API's health and the workers together, so the first
    model is announced the moment both it and the API answer. A worker counts
    as ready when it (under prefork, its pool process) has said in Redis that
    the model is loaded. The worker's main process connects its consumer meanwhile (in
    the logs, before the load ends); were it a moment later, a job queued
    then waits in the queue and is taken when it attaches, so nothing sent
    once the key is there is lost. A Celery ping confirmed the consumer
    too, at the price of Celery's imports in this long-lived process.

    A worker that exits is started again under its :class:`RestartPolicy`
    (without blocking the loop: a restart is due at a time), unless the
    stack is still starting and that worker never got ready: then its
    model cannot be served as configured (a broken file, a bad setting) and
    :class:`NeverReady` names the reason, rather than loop (``up`` gives
    that model up and starts the next, or stops if none is left). The API and Redis
    are not restarted: their exit stops the stack (:func:`check_alive`).
    """

    def __init__(self, settings: Settings, stack: Stack, env: dict[str, str], redis_url: str,
                 say: Callable[[str], None], started: float) -> None:
        from govgate.resp import small_client

        self.stack, self.env, self.say, self.started = stack, env, say, started
        self.logs = stack.logs
        self.health_url = f"http://{settings.host}:{settings.port}/readyz"
        self.redis = small_client(redis_url)
        self.api_ready = False
        self.api_started = 0.0
        self.pending: dict[str, float] = {}  # model -> when its worker was started
        #: The startup phase is over (the banner is out): a worker that exits now is restarted.
        self.serving = False
        self.ever_ready: set[str] = set()
        self.policies: dict[str, RestartPolicy] = {}
        self.restart_due: dict[str, float] = {}  # model -> when its exited worker is started again
        self.given_up: set[str] = set()
        #: Longest a worker may take to load its model the first time (``GOVGATE_WORKER_START_TIMEOUT_S``).
        self.load_timeout_s = settings.worker_start_timeout_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def start_api(self) -> None:
        self.api_started = time.monotonic()
        self.stack.api = spawn_govgate(["serve"], self.env, private_log(self.logs / "api.log"))

    def start_worker(self, name: str) -> None:
        """Start ``name``'s worker: :class:`NotStarted` if that was refused for a reason that may pass (then
        nothing of it runs), an ``OSError`` (:func:`command_gone`) if its command cannot be run any more."""
        from govgate.resp import client_errors

        log_path = self.logs / f"worker-{name}.log"
        try:
            log_file = private_log(log_path)
        except OSError as exc:
            raise NotStarted(name, f"cannot open its log {log_path} ({exc.strerror or exc})") from exc
        with log_file:  # the child holds its own descriptor
            try:
                proc = spawn_govgate(["worker", "--model", name], self.env, log_file)
            except OSError as exc:
                if command_gone(exc):
                    raise
                raise NotStarted(name, f"cannot start a process ({exc.strerror or exc})") from exc
        try:
            # A key left by an earlier run's worker with the same pid must not count (it loads for seconds).
            self.redis.delete(_loaded_key(name, proc.pid))
        except client_errors(self.redis) as exc:
            # Without that DEL a stale key could announce it ready: it goes, and the start is tried again.
            _kill_now(proc)
            raise NotStarted(name, f"Redis refused a write ({' '.join(str(exc).split())})") from exc
        self.stack.workers[name] = proc
        self.pending[name] = time.monotonic()
        self.policies.setdefault(name, RestartPolicy()).started(self.pending[name])
        self.say(f"  worker for model {name}: starting (log: {log_path})")

    def start_later(self, name: str) -> None:
        """Once serving, start a later model's worker; a refusal that may pass is retried like a restart."""
        try:
            self.start_worker(name)
        except NotStarted as refused:
            self._retry_later(refused, time.monotonic())

    def _retry_later(self, refused: NotStarted, now: float) -> None:
        retry = self.policies.setdefault(refused.model, RestartPolicy()).not_started(now)
        self.restart_due[refused.model] = now + retry.delay_s
        self.say(f"  worker for model {refused.model}: not started: {refused.why}; trying again in "
                 f"{retry.delay_s:g}s")

    def poll(self, timeout_s: float | None = None, api_timeout_s: float = 60) -> list[str]:
        """Check once; the models whose workers became ready for the first time since the last call.

        A restarted worker that is ready again is announced here ("ready again after …"). A worker
        whose model was never ready and that has loaded for longer than ``timeout_s`` (the load
        timeout, ``GOVGATE_WORKER_START_TIMEOUT_S``) is hung, not slow: see :meth:`_stop_hung`.
        """
        check_alive(self.stack, workers=False)
        self._restart_exited()
        if not self.api_ready and self.stack.api is not None:
            why = api_not_ready(self.health_url)
            self.api_ready = why is None
            if why is not None and time.monotonic() - self.api_started > api_timeout_s:
                raise StartupError(f"the API did not become ready at {self.health_url} within {api_timeout_s:.0f}s: "
                                   f"{why}")
        if not self.pending:
            return []
        first_time: list[str] = []
        for name in [name for name in self.pending if self._loaded(name)]:
            since = self.pending.pop(name)
            if name in self.ever_ready:
                self.say(f"  model {name}: ready again after {time.monotonic() - since:.1f}s")
            else:
                self.ever_ready.add(name)
                first_time.append(name)
        limit = self.load_timeout_s if timeout_s is None else timeout_s
        # A restarted worker that is slow to load is not a failed start: its requests wait in its queue.
        for name in [name for name, since in self.pending.items()
                     if name not in self.ever_ready and time.monotonic() - since > limit]:
            self._stop_hung(name, limit)
        return first_time

    def _stop_hung(self, name: str, limit_s: float) -> None:
        """``name``'s worker has not loaded its model within ``limit_s``: stop it (its whole process group:
        a prefork pool process may be the one stuck) and give the model up, as for a worker that exited.

        While the stack starts, :class:`NeverReady` lets ``up`` try the next model (a hung first model
        used to stop the whole start); once serving, a later model that hangs is given up with a line
        and the others keep serving (it used to stop the running stack).
        """
        proc = self.stack.workers[name]
        stop_process(proc, timeout_s=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.pending.pop(name, None)
        why = f"did not load its model within {limit_s:.0f}s (GOVGATE_WORKER_START_TIMEOUT_S), so it was stopped"
        if self.logs:
            why += f" (see {self.logs / f'worker-{name}.log'})"
        if not self.serving:
            raise NeverReady(name, why)
        self.given_up.add(name)
        self.say(f"  worker for model {name}: {why}; it never got ready, so not again: {_UNSERVED.format(name=name)}")

    def _restart_exited(self) -> None:
        """Decide for each worker found exited, and start those whose wait is over."""
        now = time.monotonic()
        for name, proc in list(self.stack.workers.items()):
            code = proc.poll()
            if code is None or name in self.restart_due or name in self.given_up:
                continue
            why = exit_reason(self.stack, f"worker {name}", code)
            if not self.serving and code == REDIS_REFUSED_EXIT:
                # Redis's state, not the model's: giving it up and trying the next met the same Redis until no
                # model was left, each named "never got ready". The start stops, as for a refused start.
                self.pending.pop(name, None)
                raise StartupError(f"worker for model {name} stopped: Redis refuses writes ({why}); make Redis "
                                   "write again (a full disk under its RDB/AOF: MISCONF), then start again")
            if not self.serving and name not in self.ever_ready:
                self.pending.pop(name, None)
                raise NeverReady(name, why)
            self.pending.pop(name, None)
            if code == REDIS_REFUSED_EXIT:  # no crash of its model: waited for and tried again, never given up
                retry = self.policies.setdefault(name, RestartPolicy()).not_started(now)
                self.restart_due[name] = now + retry.delay_s
                self.say(f"  worker for model {name}: stopped: Redis refuses writes ({why}); trying again in "
                         f"{retry.delay_s:g}s")
                continue
            policy = self.policies.setdefault(name, RestartPolicy())
            decision = policy.exited(now)
            if isinstance(decision, GiveUp):
                self.given_up.add(name)
                self.say(f"  worker for model {name}: {why}; restarted {decision.recent} times in the last "
                         f"{policy.window_s:.0f}s, so not again: {_UNSERVED.format(name=name)}")
            else:
                self.restart_due[name] = now + decision.delay_s
                self.say(f"  worker for model {name}: {why}; restarting in {decision.delay_s:g}s "
                         f"({decision.recent} in the last {policy.window_s:.0f}s)")
        for name, due in list(self.restart_due.items()):
            if now >= due:
                del self.restart_due[name]
                try:
                    self.start_worker(name)
                except NotStarted as refused:  # Redis refusing writes on a full disk: tried again, not given up
                    self._retry_later(refused, now)
                except OSError as exc:  # the command itself is gone (a venv replaced under us): not the others'
                    self.given_up.add(name)
                    self.say(f"  worker for model {name}: cannot be started again ({exc.strerror or exc}), so "
                             f"not again: {_UNSERVED.format(name=name)}")

    def give_up_unloaded(self, failed: NeverReady) -> None:
        """During the start: ``failed.model`` is not started again (its worker never got ready)."""
        self.given_up.add(failed.model)
        self.say(f"  worker for model {failed.model}: {failed.why}; it never got ready, so not again: "
                 f"{_UNSERVED.format(name=failed.model)}")

    def _loaded(self, name: str) -> bool:
        """The worker (or its pool process) has loaded the model."""
        return bool(self.redis.exists(_loaded_key(name, self.stack.workers[name].pid)))

    def close(self) -> None:
        self.redis.close()
