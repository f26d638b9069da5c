"""The children ``govgate up`` started, and waiting until they answer.

A :class:`Stack` stops its children in reverse start order. While the stack
comes up, every wait also checks that no child has died, so a child that
exits early is reported with the last line of its log instead of a timeout.
The benches start the same children and wait with the same functions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from govgate.processes import stop_process
from govgate.redis_server import RedisProcess

#: How often a stop waiting for the API looks whether it was told to hurry (a second Ctrl-C).
HURRY_POLL_S = 0.2


class StartupError(RuntimeError):
    """The stack could not be brought up; the message says what to do."""


@dataclass
class Stack:
    """What ``up`` started, in start order (stopped in reverse)."""

    redis: RedisProcess | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    api: subprocess.Popen | None = None
    logs: Path | None = None
    #: How long the stopping API may take before it is killed: its drain (``GOVGATE_DRAIN_S``) and the
    #: rest of its stop (``gateway.serving.stop_deadline_s``), so its requests in flight all get an answer.
    api_stop_s: float = 15.0
    #: The API's drain (``GOVGATE_DRAIN_S``), for the line a stop prints.
    drain_s: float | None = None
    #: Set by :meth:`stop`: a Ctrl-C now is a second one.
    stopping: bool = False
    #: Set by :meth:`hurry`: the API's drain is cut short.
    hurried: bool = False
    #: The signal that hurried it (for the line a stop prints: a SIGTERM is no "Ctrl-C again").
    hurried_by: int | None = None

    def children(self) -> dict[str, subprocess.Popen]:
        named = {f"worker {name}": proc for name, proc in self.workers.items()}
        if self.api is not None:
            named["api"] = self.api
        if self.redis is not None:
            named["redis"] = self.redis.process
        return named

    def hurry(self, signum: int | None = None) -> None:
        """A second Ctrl-C (or SIGTERM, ``signum``): the API's drain ends its requests in flight now (:meth:`stop`).

        Safe in a signal handler: it only sets flags, which the stop's wait for the API acts on.
        """
        self.hurried_by = signum
        self.hurried = True

    def stop(self, say: Callable[[str], None] | None = None) -> None:
        """The API first, drained (``gateway/drain.py``): its requests in flight finish, or are ended with an
        answer, while the workers still run them; then the workers, then Redis.

        ``say``: where to tell the operator how long the drain may take and that Ctrl-C again skips it.
        """
        self.stopping = True
        if self.api is not None:
            self._stop_api(say or (lambda line: None))
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            stop_process(proc, timeout_s=30)
        if self.redis is not None:
            self.redis.stop()

    def _stop_api(self, say: Callable[[str], None]) -> None:
        """SIGTERM to the API, then wait for its drain, up to ``api_stop_s`` (then it is killed).

        Once :meth:`hurry` was called the API is sent SIGINT, its second stop
        signal, which cuts its drain at once (``gateway/serving.py``), as a
        second Ctrl-C to ``govgate serve`` does. Before (probe p1 F3), ``up``
        ignored a second Ctrl-C and could wait ``GOVGATE_DRAIN_S`` + 30 s with
        no way out but SIGKILL. SIGINT, not SIGTERM again: two SIGTERMs both
        pending when the API looks would merge into one.
        """
        api = self.api
        assert api is not None
        if api.poll() is not None:
            return
        api.send_signal(signal.SIGTERM)
        if self.drain_s is not None:
            # `up` cannot know how many are in flight (the API logs it): the line claims none (probe q1).
            say(f"  api: stopping; requests still in flight, if any, get up to {self.drain_s:g}s (a second "
                "Ctrl-C or SIGTERM ends them now)")
        deadline = time.monotonic() + self.api_stop_s
        told = False
        while api.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                api.kill()
                break
            if self.hurried and not told:
                again = "a second SIGTERM" if self.hurried_by == signal.SIGTERM else "Ctrl-C again"
                say(f"  api: {again}: its requests in flight, if any, are ended now")
                api.send_signal(signal.SIGINT)
                told = True
            try:
                api.wait(min(HURRY_POLL_S, left))
            except subprocess.TimeoutExpired:
                pass
        api.wait()

def ready_hosts(app, timeout_s: float) -> set[str]:
    """Model names of the workers that answer a Celery ping now."""
    names = set()
    for reply in app.control.ping(timeout=timeout_s) or []:
        for hostname in reply:
            names.add(hostname.split("@", 1)[0].rsplit(".", 1)[0])
    return names


def wait_for_workers(redis_url: str, models: list[str], stack: Stack, timeout_s: float = 120) -> None:
    """Block until a worker of every model answers a Celery ping."""
    from workers.contract.celery_config import make_celery

    app = make_celery(redis_url)
    waiting = set(models)
    deadline = time.monotonic() + timeout_s
    try:
        while waiting and time.monotonic() < deadline:
            check_alive(stack)
            waiting -= ready_hosts(app, 0.5)
    finally:
        app.close()
    if waiting:
        raise StartupError(f"no worker answered for {sorted(waiting)} within {timeout_s:.0f}s")


def healthy(url: str) -> bool:
    """The API at ``url`` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


#: The checks of ``/readyz`` the API itself needs (the workers are ``govgate up``'s to watch).
API_CHECKS = ("database", "redis", "policy")


def api_not_ready(url: str) -> str | None:
    """Why the API at ``url`` cannot serve yet, as ``/readyz`` says it; None once its database, Redis and
    policy answer (its workers are not asked).

    ``govgate up`` watches each model's worker itself and announces models one
    by one, so a model still loading must not hold back the API's readiness.
    The reason is what ``govgate up`` reports when the API never gets ready: "redis: error:
    refuses writes: OutOfMemoryError: …" tells an operator what to fix, "did
    not become ready" alone does not.
    """
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return None if response.status == 200 else f"/readyz answered {response.status}"
    except urllib.error.HTTPError as error:
        if error.code != 503:
            return f"/readyz answered {error.code}"
        try:
            checks = json.loads(error.read())["checks"]
        except (ValueError, KeyError, TypeError, OSError):
            return "/readyz answered 503 without its checks"
        if not isinstance(checks, dict):
            return "/readyz answered 503 without its checks"
        failing = [f"{name}: {checks.get(name)}" for name in API_CHECKS if checks.get(name) != "ok"]
        return "; ".join(failing) or None
    except OSError as exc:
        return f"no answer ({exc.__class__.__name__})"


def wait_for_api(url: str, stack: Stack, timeout_s: float = 60) -> None:
    """Block until the API's health check at ``url`` answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive(stack)
        if healthy(url):
            return
        time.sleep(0.1)
    raise StartupError(f"the API did not become healthy at {url} within {timeout_s:.0f}s")


def check_alive(stack: Stack, *, workers: bool = True) -> None:
    """Raise ``StartupError`` naming the first child that has exited, with its log's last line.

    ``workers=False`` leaves the workers out: ``govgate up`` restarts those itself (govgate/restarts.py).
    """
    for name, proc in stack.children().items():
        if not workers and name.startswith("worker "):
            continue
        code = proc.poll()
        if code is not None:
            raise StartupError(f"{name} {exit_reason(stack, name, code)}")


def exit_reason(stack: Stack, name: str, code: int) -> str:
    """``exited with code C: <last line of its log> (see <log>)`` for the child ``name`` of :meth:`Stack.children`."""
    exited = f"exited with code {code}{_signal_name(code)}"
    if not stack.logs or name == "redis":
        return exited
    log = stack.logs / (name.replace(" ", "-") + ".log")
    last = _last_line(log)
    return f"{exited}{': ' + last if last else ''} (see {log})"


def _signal_name(code: int) -> str:
    """`` (SIGBUS)`` for a child killed by a signal (a negative code): a killed process logs no reason, and its
    log's last line (often a routine one) says nothing of why it died (a model file cut short under a running
    worker is SIGBUS, an out-of-bounds read SIGSEGV, the OOM killer SIGKILL)."""
    if code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return ""


def _last_line(log: Path) -> str:
    """The last whole non-blank line of a child's log (usually the reason it stopped).

    A log that ends mid-line (a write cut short: the disk full, or the child killed while writing) has its
    last whole line quoted, marked as such: the fragment (``File "/wor``) said nothing, and a full disk is
    worth a look. Only its last 4 KiB are read; a first line cut by that window is left out too.
    """
    try:
        with log.open("rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - 4096)
            f.seek(start)
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = tail.split("\n")
    cut = lines.pop() != "" and bool(lines)  # no newline at the end: the last line is a fragment
    if start > 0 and lines:
        lines.pop(0)
    whole = [line.strip() for line in lines if line.strip()]
    if not whole:
        return "" if cut or not tail.strip() else tail.strip()
    return whole[-1] + (" (the log ends mid-line: a full disk?)" if cut else "")
