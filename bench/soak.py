"""Faults, measured: does every promise of the audit hold while parts of the stack die?

Starts a private stack on loopback and a unix socket (Redis with its
append-only file, as ``govgate up`` runs it; two tiny-model workers; two
``govgate serve`` gateways) in a temporary folder, then sends requests
(chat and text, streaming and not, ~16 at a time, alternating between the
gateways) while it injects faults on a schedule, one after another:

* ``worker_kill``: SIGKILL a whole worker (main process and pool child at
  once), then start a replacement;
* ``pool_kill``: SIGKILL a worker's pool child (Celery forks a new one);
* ``redis_restart`` / ``redis_kill``: stop Redis (SIGTERM / SIGKILL), start
  it again on the same socket and data folder a few seconds later;
* ``gateway_term`` / ``gateway_kill``: stop a gateway (SIGTERM / SIGKILL) and
  start it again on the same port;
* ``client_disconnect``: the next few streaming clients hang up after their
  first piece of text.

It prints the count of each outcome (status and error code; a stream ended
with ``[DONE]`` or with an error event; a client disconnect; a transport
error), the recovery time after each fault (from the fault to the end of the
first successful request sent after it, through the same gateway for gateway
faults), and then checks the audit store:

* every served answer (a 200, or a stream that ended with ``[DONE]``) has
  exactly one ``request`` entry and a ``completion`` entry whose output is
  exactly the text the client got;
* a stream cut short (error event, disconnect, broken connection) that had
  already delivered text has a terminal entry whose output begins with that
  text;
* every accepted request has exactly one terminal entry (waiting, bounded,
  for entries that a rescuer writes after the broker's visibility timeout);
* no request id has two ``request`` entries;
* ``audit verify`` passes;
* no process the soak did not kill itself exited.

It ends with a verdict line and exits 1 if any check fails. Nothing here
asserts a timing. The core is :func:`run_soak`, which ``tests/test_soak.py``
calls for a short run.

Usage::

    .venv/bin/python bench/soak.py [--requests 3000] [--concurrency 16] [--duration 900]
                                   [--faults worker_kill,pool_kill,...] [--json]

Everything started here is stopped at the end, also on Ctrl-C, SIGTERM or an
error; if this process is killed outright, its children receive SIGTERM
(``PR_SET_PDEATHSIG``). The temporary folder is removed (``--keep`` keeps it,
with every process's log, and prints where).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

# The stack helpers of the overhead bench (this folder is sys.path[0] when run as a script).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402
    BENCH_PRINCIPAL,
    BENCH_TEAM,
    HEALTH_PATH,
    HOST,
    TempDir,
    _stop_on_sigterm,
    bench_policy_dir,
    free_port,
    signals_deferred,
    spawn,
)

WORKER_KILL = "worker_kill"
POOL_KILL = "pool_kill"
REDIS_RESTART = "redis_restart"
REDIS_KILL = "redis_kill"
GATEWAY_TERM = "gateway_term"
GATEWAY_KILL = "gateway_kill"
CLIENT_DISCONNECT = "client_disconnect"
#: Every kind of fault, in the order a default run injects them.
FAULT_KINDS = (POOL_KILL, WORKER_KILL, REDIS_RESTART, GATEWAY_TERM, CLIENT_DISCONNECT, GATEWAY_KILL, REDIS_KILL)
_GATEWAY_FAULTS = (GATEWAY_TERM, GATEWAY_KILL)

#: The outcome of a client that hung up on purpose.
DISCONNECTED = "client disconnect mid-stream"
CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
REQUEST_ID_HEADER = "x-govgate-request-id"
#: How long Redis stays down in a Redis fault (the issue's follow-up used 5 s).
REDIS_DOWN_S = 3.0
#: The gateways' request timeout: a job lost with a worker ends (504) after this.
REQUEST_TIMEOUT_S = 15.0
#: A generation's soft limit in the workers; the broker's visibility timeout
#: (when a dead worker's task goes to another) is this + 10 s + 30 s.
GENERATION_LIMIT_S = 2.0
#: Longest wait for one process to start and answer.
START_TIMEOUT_S = 120.0

CHECKS = {
    "served_audited": "every served answer has one request entry and a completion entry",
    "outputs_equal": "the completion entry's output is exactly what the client got",
    "partial_streams_audited": "text delivered by a stream cut short is the start of its terminal entry's output",
    "one_terminal_per_accepted": "every accepted request has exactly one terminal entry",
    "one_request_entry": "no request id has two request entries",
    "chain_verifies": "audit verify passes",
    "no_unplanned_exit": "no process exited that the soak did not kill",
    "all_faults_injected": "every scheduled fault was injected before the deadline",
}


# ---------------------------------------------------------------- records


@dataclass
class Sent:
    """One request as the client saw it."""

    index: int
    gateway: int
    stream: bool
    started: float
    ended: float = 0.0
    wall: float = 0.0
    status: int | None = None
    outcome: str = ""
    request_id: str | None = None
    text: str = ""
    #: A 200 answer, or a stream that ended with ``[DONE]``.
    served: bool = False


@dataclass
class Fault:
    """One injected fault: when, what, and how long the stack took to answer again."""

    kind: str
    #: When it was injected: ``time.monotonic()`` (client records) and ``time.time()`` (audit entries).
    at: float
    wall: float = 0.0
    detail: str = ""
    #: Seconds until the restarted part answered (None: nothing to restart).
    restart_s: float | None = None
    #: Seconds from the fault to the end of the first successful request sent after it.
    recovery_s: float | None = None
    gateway: int | None = None


@dataclass
class Check:
    """One audit promise: held or not, how often it broke, near which faults, a few examples."""

    ok: bool
    failures: int
    examples: list[str] = field(default_factory=list)
    #: Failures counted by the fault they followed (``before any fault`` when none had happened).
    by_fault: Counter = field(default_factory=Counter)


@dataclass
class SoakReport:
    """What :func:`run_soak` measured and found; ``ok`` is the verdict."""

    requests: int
    concurrency: int
    wall_s: float
    outcomes: Counter
    faults: list[Fault]
    checks: dict[str, Check]
    audit_entries: int = 0
    accepted: int = 0
    log_problems: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.ok]

    def verdict(self) -> str:
        if self.ok:
            return (f"soak: PASS: {self.requests} requests, {len(self.faults)} faults, "
                    f"{self.accepted} accepted, every audit check holds")
        return f"soak: FAIL: {', '.join(self.failed_checks)}"

    def render(self) -> str:
        """The figures as aligned text, ending with the verdict line."""
        lines = [f"{self.requests} requests at concurrency {self.concurrency} in {self.wall_s:.1f}s "
                 f"({self.requests / self.wall_s:.1f} req/s), {os.cpu_count()} CPUs", "", "outcomes:"]
        for outcome, count in sorted(self.outcomes.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>7}  {outcome}")
        lines += ["", "faults:                at s    restart s   recovery s  detail"]
        start = self.faults[0].at if self.faults else 0.0
        for fault in self.faults:
            lines.append(f"  {fault.kind:<18}{fault.at - start:>8.1f}{_cell(fault.restart_s):>13}"
                         f"{_cell(fault.recovery_s, 'never'):>13}  {fault.detail}")
        lines += ["", f"audit: {self.audit_entries} entries, {self.accepted} accepted requests"]
        for name, check in self.checks.items():
            mark = "ok  " if check.ok else "FAIL"
            near = ", ".join(f"{kind} {count}" for kind, count in check.by_fault.most_common())
            lines.append(f"  {mark} {name}: {CHECKS[name]}"
                         + ("" if check.ok else f" ({check.failures} failures{': ' + near if near else ''})"))
            lines.extend(f"         e.g. {example}" for example in check.examples)
        if self.log_problems:
            lines += ["", "log lines worth a look: " + ", ".join(
                f"{name} {count}" for name, count in sorted(self.log_problems.items()))]
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def to_document(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 2),
            "outcomes": dict(self.outcomes), "accepted": self.accepted, "audit_entries": self.audit_entries,
            "faults": [{"kind": f.kind, "detail": f.detail, "restart_s": _rounded(f.restart_s),
                        "recovery_s": _rounded(f.recovery_s)} for f in self.faults],
            "checks": {name: {"ok": c.ok, "failures": c.failures, "examples": c.examples,
                              "by_fault": dict(c.by_fault)}
                       for name, c in self.checks.items()},
            "log_problems": self.log_problems, "ok": self.ok,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cell(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.1f}"


# ---------------------------------------------------------------- the stack


class SoakStack:
    """Redis, workers and gateways the soak starts, breaks and restarts.

    Every process ever started is remembered, so :meth:`stop` leaves none
    behind; those the soak killed on purpose are remembered too, so an exit
    nobody asked for can be told apart.
    """

    def __init__(self, var_dir: Path, *, workers: int, gateways: int, request_timeout_s: float,
                 generation_limit_s: float, log_level: str = "INFO") -> None:
        from gateway.settings import Settings
        from workers.registry import TINY_MODEL_NAME

        self.var_dir = var_dir
        self.logs = var_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis: Any = None
        self.worker_count = workers
        self.workers: list[subprocess.Popen] = []
        self.gateways: list[subprocess.Popen] = []
        self.ports = [free_port() for _ in range(gateways)]
        self.planned_exits: set[int] = set()
        #: Faults run here, one thread for the stack's whole life: Linux sends a child its
        #: PR_SET_PDEATHSIG when the *thread* that forked it ends, so a process restarted
        #: from a short-lived thread (asyncio.to_thread) would be stopped when that thread is.
        self.fault_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soak-faults")
        self._spawned: list[subprocess.Popen] = []
        self._starts: Counter = Counter()
        self.settings = Settings(var_dir=var_dir, policy_dir=bench_policy_dir(var_dir), host=HOST,
                                 port=self.ports[0], log_level=log_level, request_timeout_s=request_timeout_s,
                                 generation_time_limit_s=generation_limit_s)
        self.secret = ""
        self.model = TINY_MODEL_NAME

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def start(self) -> None:
        """Redis, the API key, the workers, the gateways; each waited for (call :meth:`stop` also on failure)."""
        self._start_redis()
        self.settings = self.settings.with_(redis_url=self.redis.url)
        self.secret = self._create_key()
        for _ in range(self.worker_count):
            self.workers.append(self._spawn_worker())
        for process in self.workers:
            self._wait_worker(process)
        self.gateways = [self._spawn_gateway(i) for i in range(len(self.ports))]
        for i in range(len(self.ports)):
            self._wait_gateway(i)

    def _create_key(self) -> str:
        from gateway.auth import KeyStore
        from gateway.components import open_database

        engine = open_database(self.settings)
        try:
            return KeyStore(engine).create(BENCH_PRINCIPAL, team=BENCH_TEAM, roles=["admin"],
                                           note="bench/soak.py").secret
        finally:
            engine.dispose()

    def _env(self, port: int | None = None) -> dict[str, str]:
        from gateway.supervisor import child_env

        settings = self.settings if port is None else self.settings.with_(port=port)
        return child_env(settings, self.redis.url)

    def _log(self, name: str) -> Path:
        self._starts[name] += 1
        return self.logs / f"{name}-{self._starts[name]}.log"

    def _start_redis(self) -> None:
        from gateway.redis_server import RedisProcess

        self.redis = RedisProcess.start(self.var_dir / "redis", persist=True)
        self._spawned.append(self.redis.process)

    def _spawn_worker(self) -> subprocess.Popen:
        from workers.registry import TINY_MODEL_NAME

        process = spawn(["-m", "gateway.cli", "worker", "--model", TINY_MODEL_NAME], self._env(),
                        self._log("worker"))
        self._spawned.append(process)
        return process

    def _wait_worker(self, process: subprocess.Popen) -> None:
        """Until this very worker (its hostname holds its pid) answers a Celery ping."""
        import kombu.exceptions
        import redis

        from workers.celery_app import make_celery

        app = make_celery(self.redis.url)
        prefix = f".{process.pid}@"
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"worker {process.pid} exited with {process.returncode} while starting")
                try:
                    replies = app.control.ping(timeout=0.5) or []
                except (OSError, redis.RedisError, kombu.exceptions.KombuError):
                    time.sleep(0.2)
                    continue
                if any(prefix in name for reply in replies for name in reply):
                    return
        finally:
            app.close()
        raise TimeoutError(f"worker {process.pid} did not answer within {START_TIMEOUT_S:.0f}s")

    def _spawn_gateway(self, index: int) -> subprocess.Popen:
        process = spawn(["-m", "gateway.cli", "serve"], self._env(self.ports[index]), self._log(f"gateway{index}"))
        self._spawned.append(process)
        return process

    def _wait_gateway(self, index: int) -> None:
        import urllib.request

        process = self.gateways[index]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gateway {index} exited with {process.returncode} while starting")
            try:
                with urllib.request.urlopen(self.urls[index] + HEALTH_PATH, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway {index} did not become healthy within {START_TIMEOUT_S:.0f}s")

    # -- faults (blocking; run in a thread) --------------------------------

    def kill_worker(self, index: int = 0) -> tuple[str, float]:
        """SIGKILL a whole worker and its pool at once (no chance to hand tasks back), start another."""
        victim = self.workers[index]
        children = _children(victim.pid)
        for pid in [victim.pid, *children]:
            self.planned_exits.add(pid)
            _kill(pid)
        victim.wait()
        started = time.monotonic()
        self.workers[index] = self._spawn_worker()
        self._wait_worker(self.workers[index])
        return f"worker {victim.pid} and pool {children}", time.monotonic() - started

    def kill_pool_child(self, index: int = 0) -> tuple[str, float | None]:
        """SIGKILL one pool process of a worker; Celery forks a new one (nothing to restart here)."""
        children = _children(self.workers[index].pid)
        if not children:
            return "no pool process found", None
        self.planned_exits.add(children[0])
        _kill(children[0])
        return f"pool process {children[0]} of worker {self.workers[index].pid}", None

    def restart_redis(self, sig: int, down_s: float) -> tuple[str, float]:
        """Stop Redis with ``sig``, leave it down ``down_s``, start it on the same socket and data."""
        process = self.redis.process
        self.planned_exits.add(process.pid)
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        time.sleep(down_s)
        started = time.monotonic()
        self._start_redis()
        return f"redis down {down_s:g}s ({signal.Signals(sig).name})", time.monotonic() - started

    def restart_gateway(self, index: int, sig: int) -> tuple[str, float]:
        """Stop gateway ``index`` with ``sig`` and start it again on the same port."""
        process = self.gateways[index]
        self.planned_exits.add(process.pid)
        process.send_signal(sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        started = time.monotonic()
        self.gateways[index] = self._spawn_gateway(index)
        self._wait_gateway(index)
        return f"gateway {index} ({signal.Signals(sig).name})", time.monotonic() - started

    # -- the end -----------------------------------------------------------

    def unplanned_exits(self) -> list[str]:
        """Processes that ended although the soak did not stop them."""
        named = [("redis", self.redis.process)] if self.redis else []
        named += [(f"worker {p.pid}", p) for p in self.workers] + [(f"gateway {i}", p)
                                                                     for i, p in enumerate(self.gateways)]
        found = [f"{name} exited with {p.returncode}" for name, p in named
                 if p.poll() is not None and p.pid not in self.planned_exits]
        for worker in self.workers:  # a pool process that died alone is replaced; one that never came back is not
            if worker.poll() is None and not _children(worker.pid):
                found.append(f"worker {worker.pid} has no pool process")
        return found

    def stop(self) -> None:
        """Gateways, then workers, then Redis; anything else ever started is killed."""
        from gateway.processes import stop_process

        for process in self.gateways:
            stop_process(process, timeout_s=15)
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            stop_process(process, timeout_s=30)
        if self.redis is not None:
            self.redis.stop()
        for process in self._spawned:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.fault_thread.shutdown(wait=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- traffic


@dataclass
class Plan:
    """What the traffic and the fault schedule share while the soak runs."""

    requests: int
    concurrency: int
    deadline: float
    faults: list[str]
    stream_share: float
    max_tokens: int
    disconnects_per_fault: int
    request_timeout_s: float
    seed: int = 7


class Traffic:
    """Clients sending requests, and the schedule injecting faults between them."""

    def __init__(self, stack: SoakStack, plan: Plan, say: Callable[[str], None]) -> None:
        self.stack = stack
        self.plan = plan
        self.say = say
        self.sent: list[Sent] = []
        self.faults: list[Fault] = []
        self.disconnects_left = 0
        self.faults_done = False
        self.random = random.Random(plan.seed)
        self._lock = threading.Lock()

    async def run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.plan.concurrency, max_keepalive_connections=self.plan.concurrency)
        timeout = httpx.Timeout(self.plan.request_timeout_s + 30, connect=5)
        headers = {"Authorization": f"Bearer {self.stack.secret}"}
        clients = [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout)
                   for url in self.stack.urls]
        try:
            schedule = asyncio.create_task(self._schedule())
            await asyncio.gather(*(self._loop(clients) for _ in range(self.plan.concurrency)))
            if not schedule.done():  # the deadline passed first
                schedule.cancel()
            await asyncio.gather(schedule, return_exceptions=True)
        finally:
            for client in clients:
                await client.aclose()

    def _more(self) -> bool:
        if time.monotonic() >= self.plan.deadline:
            return False
        return len(self.sent) < self.plan.requests or not self.faults_done

    async def _loop(self, clients: list[Any]) -> None:
        while self._more():
            index = len(self.sent)
            record = Sent(index=index, gateway=index % len(clients), stream=False, started=time.monotonic())
            self.sent.append(record)
            disconnect = False
            if self.disconnects_left > 0:
                self.disconnects_left -= 1
                disconnect = True
            record.stream = disconnect or self.random.random() < self.plan.stream_share
            chat = self.random.random() < 0.5
            body = _body(self.stack.model, index, chat, record.stream, self.random.randint(2, self.plan.max_tokens))
            bound = self.plan.request_timeout_s * 2 + 30
            try:
                async with asyncio.timeout(bound):
                    await _send(clients[record.gateway], CHAT_PATH if chat else TEXT_PATH, body, record, chat,
                                disconnect)
            except TimeoutError:
                record.outcome = record.outcome or f"no answer within {bound:g}s"
            record.wall = time.time()
            record.ended = time.monotonic()
            if not record.served and record.outcome != DISCONNECTED:
                # A client backs off on errors; spinning would only count refusals.
                await asyncio.sleep(1.0 if record.outcome.startswith("transport") else 0.25)

    async def _schedule(self) -> None:
        """Each fault at its share of the requests, once the previous one has recovered (bounded)."""
        try:
            count = len(self.plan.faults)
            for number, kind in enumerate(self.plan.faults, start=1):
                mark = number * self.plan.requests // (count + 1)
                while len(self.sent) < mark and time.monotonic() < self.plan.deadline:
                    await asyncio.sleep(0.05)
                if time.monotonic() >= self.plan.deadline:
                    self.say(f"soak: deadline reached before fault {kind}")
                    return
                fault = await self._inject(kind, number)
                self.faults.append(fault)
                self.say(f"soak: fault {number}/{count} {kind}: {fault.detail}")
                await self._await_recovery(fault)
        finally:
            self.faults_done = True

    async def _inject(self, kind: str, number: int) -> Fault:
        stack = self.stack
        at, wall = time.monotonic(), time.time()
        gateway = None

        async def in_fault_thread(function: Callable[..., Any], *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(stack.fault_thread, function, *args)

        if kind == WORKER_KILL:
            detail, restart = await in_fault_thread(stack.kill_worker, 0)
        elif kind == POOL_KILL:
            detail, restart = await in_fault_thread(stack.kill_pool_child, 0)
        elif kind in (REDIS_RESTART, REDIS_KILL):
            sig = signal.SIGTERM if kind == REDIS_RESTART else signal.SIGKILL
            detail, restart = await in_fault_thread(stack.restart_redis, sig, REDIS_DOWN_S)
        elif kind in _GATEWAY_FAULTS:
            gateway = number % len(stack.ports)
            sig = signal.SIGTERM if kind == GATEWAY_TERM else signal.SIGKILL
            detail, restart = await in_fault_thread(stack.restart_gateway, gateway, sig)
        elif kind == CLIENT_DISCONNECT:
            self.disconnects_left = self.plan.disconnects_per_fault
            detail, restart = f"next {self.plan.disconnects_per_fault} clients hang up mid-stream", None
        else:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        return Fault(kind=kind, at=at, wall=wall, detail=detail, restart_s=restart, gateway=gateway)

    async def _await_recovery(self, fault: Fault, timeout_s: float | None = None) -> None:
        """Wait (bounded) for a success after the fault, so faults are told apart."""
        limit = time.monotonic() + (timeout_s or self.plan.request_timeout_s * 2 + 30)
        while time.monotonic() < min(limit, self.plan.deadline):
            if recovery_of(fault, self.sent) is not None:
                return
            await asyncio.sleep(0.1)


def _body(model: str, index: int, chat: bool, stream: bool, max_tokens: int) -> dict[str, Any]:
    text = f"Tell a short story number {index}."
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _piece(event: dict[str, Any], chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if chat:
        return choices[0].get("delta", {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-openai-shaped"


async def _send(client: Any, path: str, body: dict[str, Any], record: Sent, chat: bool, disconnect: bool) -> None:
    """One request; fills in ``record`` (outcome label, text, request id)."""
    import httpx

    try:
        if not record.stream:
            response = await client.post(path, json=body)
            record.status = response.status_code
            record.request_id = response.headers.get(REQUEST_ID_HEADER)
            if response.status_code != 200:
                record.outcome = f"{response.status_code} {_error_code(response.content)}"
                return
            choice = response.json()["choices"][0]
            record.text = (choice["message"]["content"] if chat else choice["text"]) or ""
            record.outcome, record.served = "200", True
            return
        async with client.stream("POST", path, json=body) as response:
            record.status = response.status_code
            record.request_id = response.headers.get(REQUEST_ID_HEADER)
            if response.status_code != 200:
                record.outcome = f"{response.status_code} {_error_code(await response.aread())}"
                return
            pieces: list[str] = []
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        record.outcome, record.served = "200 stream [DONE]", True
                        return
                    event = json.loads(data)
                    if "error" in event:
                        record.outcome = f"200 stream error event {event['error'].get('code')}"
                        return
                    piece = _piece(event, chat)
                    pieces.append(piece)
                    if disconnect and piece:
                        record.outcome = DISCONNECTED
                        return  # leaving the block closes the connection
                record.outcome = "200 stream ended without [DONE]"
            finally:
                record.text = "".join(pieces)
    except httpx.HTTPError as exc:
        where = "mid-stream" if record.status is not None else "before an answer"
        record.outcome = record.outcome or f"transport {type(exc).__name__} {where}"


def recovery_of(fault: Fault, sent: Iterable[Sent]) -> float | None:
    """Seconds from ``fault`` to the end of the first success sent after it (same gateway for gateway faults)."""
    ends = [r.ended for r in list(sent) if r.served and r.ended and r.started >= fault.at
            and (fault.gateway is None or r.gateway == fault.gateway)]
    return min(ends) - fault.at if ends else None


# ---------------------------------------------------------------- the audit


def _entries_by_request(store: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for entry in store.iter_entries():
        found.setdefault(entry.request_id, []).append(entry)
    return found


def _accepted(entries: list[Any]) -> bool:
    for entry in entries:
        if entry.kind == "request":
            body = entry.body
            return bool(body.get("decision", {}).get("allow") and (body.get("admission") or {}).get("admitted"))
    return False


def _terminals(entries: list[Any]) -> list[Any]:
    from audit import TERMINAL_KINDS

    return [e for e in entries if e.kind in TERMINAL_KINDS]


def wait_for_terminals(store: Any, bound_s: float, say: Callable[[str], None]) -> dict[str, list[Any]]:
    """The audit by request id, once every accepted request has its terminal entry or ``bound_s`` passed.

    Terminal entries can come late by design: a gateway's abandoned stream
    waits a request timeout; a dead worker's task is redelivered after the
    visibility timeout. So wait for them, bounded, rather than skip them.
    """
    deadline = time.monotonic() + bound_s
    said = False
    while True:
        by_request = _entries_by_request(store)
        open_ids = [rid for rid, entries in by_request.items() if _accepted(entries) and not _terminals(entries)]
        if not open_ids or time.monotonic() >= deadline:
            return by_request
        if not said:
            say(f"soak: waiting up to {bound_s:.0f}s for {len(open_ids)} accepted requests to end in the audit")
            said = True
        time.sleep(1.0)


class _Failures(list):
    """Failure texts, each tagged with the fault it followed."""

    def add(self, text: str, fault: Fault | None, moment: float | None = None) -> None:
        if fault is None:
            self.append(("before any fault", text))
            return
        delta = "" if moment is None else f" {moment - fault.at:+.1f}s"
        self.append((fault.kind, f"{text} [{fault.kind}{delta}]"))


def _fault_before(faults: list[Fault], moment: float) -> Fault | None:
    """The last fault injected before ``moment`` (monotonic): the one a request could have met."""
    earlier = [f for f in faults if f.at <= moment]
    return earlier[-1] if earlier else None


def _fault_met(faults: list[Fault], when: datetime, window_s: float) -> tuple[Fault | None, float | None]:
    """The fault a request first recorded at ``when`` most likely met, and ``when`` on the monotonic clock.

    The first fault within ``window_s`` after it (its longest life), else the
    last fault before it.
    """
    stamp = when.timestamp()
    later = [f for f in faults if 0 <= f.wall - stamp <= window_s]
    earlier = [f for f in faults if f.wall < stamp]
    fault = later[0] if later else earlier[-1] if earlier else None
    return fault, None if fault is None else fault.at + (stamp - fault.wall)


def _check(failures: _Failures) -> Check:
    return Check(ok=not failures, failures=len(failures), examples=[text for _, text in failures[:3]],
                 by_fault=Counter(kind for kind, _ in failures))


def audit_checks(sent: list[Sent], by_request: dict[str, list[Any]], verified: Any, unplanned: list[str],
                 faults: Iterable[Fault] = (), window_s: float = REQUEST_TIMEOUT_S) -> dict[str, Check]:
    """The audit promises, each as a :class:`Check` with a few examples of what broke it."""
    faults = list(faults)
    unaudited, unequal, partial = _Failures(), _Failures(), _Failures()
    for record in sent:
        entries = by_request.get(record.request_id or "", [])
        kinds = [e.kind for e in entries]
        terminal = _terminals(entries)
        if record.served:
            completion = [e for e in terminal if e.kind == "completion"]
        fault = _fault_before(faults, record.ended)
        if record.served:
            completion = [e for e in terminal if e.kind == "completion"]
            if record.request_id is None or kinds.count("request") != 1 or len(completion) != 1:
                unaudited.add(f"#{record.index} {record.outcome} id={record.request_id} entries={kinds}",
                              fault, record.ended)
                continue
            output = completion[0].body.get("output")
            if output != record.text:
                unequal.add(f"#{record.index} {record.outcome} id={record.request_id}: client got "
                            f"{len(record.text)} chars, audit holds {len(output or '')}", fault, record.ended)
        elif record.stream and record.text:
            output = terminal[0].body.get("output") if terminal else None
            if not isinstance(output, str) or not output.startswith(record.text):
                holder = f"its {terminal[0].kind} entry" if terminal else "no terminal entry"
                holds = "no output" if output is None else f"{len(output)} chars not starting with them"
                partial.add(f"#{record.index} {record.outcome} id={record.request_id}: delivered "
                            f"{len(record.text)} chars, {holder} holds {holds}", fault, record.ended)
    ended, twice_requested = _Failures(), _Failures()
    for request_id, entries in by_request.items():
        kinds = [e.kind for e in entries]
        fault, moment = _fault_met(faults, entries[0].created_at, window_s)
        if kinds.count("request") > 1:
            twice_requested.add(f"{request_id}: {kinds}", fault, moment)
        if _accepted(entries) and len(_terminals(entries)) != 1:
            ended.add(f"{request_id}: {kinds}", fault, moment)
    chain, exits = _Failures(), _Failures()
    if not verified.ok:
        chain.add(f"seq {verified.first_bad_seq}: {verified.problem}", None)
    for text in unplanned:
        exits.add(text, None)
    return {
        "served_audited": _check(unaudited),
        "outputs_equal": _check(unequal),
        "partial_streams_audited": _check(partial),
        "one_terminal_per_accepted": _check(ended),
        "one_request_entry": _check(twice_requested),
        "chain_verifies": _check(chain),
        "no_unplanned_exit": _check(exits),
    }


#: Log lines counted in the report: worth reading, not failures by themselves.
_LOG_PATTERNS = {"Traceback": "tracebacks", "Task was destroyed but it is pending": "destroyed pending tasks",
                 " ERROR ": "ERROR lines", " CRITICAL ": "CRITICAL lines"}


def log_problems(logs: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for log in sorted(logs.glob("*.log")):
        component = log.stem.rsplit("-", 1)[0]
        for line in log.read_text(errors="replace").splitlines():
            for pattern, name in _LOG_PATTERNS.items():
                if pattern in line:
                    counts[f"{component} {name}"] += 1
    return dict(counts)


# ---------------------------------------------------------------- the run


def run_soak(*, requests: int = 3000, concurrency: int = 16, faults: Iterable[str] = FAULT_KINDS,
             duration_s: float = 900.0, stream_share: float = 0.5, max_tokens: int = 24,
             disconnects_per_fault: int = 6, workers: int = 2, gateways: int = 2,
             request_timeout_s: float = REQUEST_TIMEOUT_S, generation_limit_s: float = GENERATION_LIMIT_S,
             settle_s: float | None = None, keep_dir: bool = False,
             say: Callable[[str], None] = lambda line: None) -> SoakReport:
    """Start a stack, send ``requests`` while injecting ``faults``, check the audit, stop everything.

    Sends at least ``requests`` (more if the faults are not all done by then)
    unless ``duration_s`` passes first. ``settle_s`` bounds the wait for late
    terminal entries afterwards; by default a request timeout plus the
    broker's visibility timeout, plus a margin.
    """
    from audit import AuditStore, make_engine, verify_chain
    from workers.celery_app import HARD_LIMIT_GRACE_S, VISIBILITY_MARGIN_S

    faults = list(faults)
    for kind in faults:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if settle_s is None:
        settle_s = request_timeout_s + generation_limit_s + HARD_LIMIT_GRACE_S + VISIBILITY_MARGIN_S + 15
    temp = TempDir()  # children get only the stack's settings: child_env drops inherited GOVGATE_* variables
    stack: SoakStack | None = None
    try:
        say(f"soak: starting the stack in {temp.path}")
        stack = SoakStack(temp.path, workers=workers, gateways=gateways, request_timeout_s=request_timeout_s,
                          generation_limit_s=generation_limit_s)
        stack.start()
        plan = Plan(requests=requests, concurrency=concurrency, deadline=time.monotonic() + duration_s,
                    faults=faults, stream_share=stream_share, max_tokens=max_tokens,
                    disconnects_per_fault=disconnects_per_fault, request_timeout_s=request_timeout_s)
        say(f"soak: {requests} requests at concurrency {concurrency}, faults: {', '.join(faults) or 'none'}")
        traffic = Traffic(stack, plan, say)
        started = time.monotonic()
        asyncio.run(traffic.run())
        wall = time.monotonic() - started
        for fault in traffic.faults:
            fault.recovery_s = recovery_of(fault, traffic.sent)
        engine = make_engine(stack.settings.effective_database_url)
        try:
            by_request = wait_for_terminals(AuditStore(engine), settle_s, say)
            verified = verify_chain(engine)
        finally:
            engine.dispose()
        checks = audit_checks(traffic.sent, by_request, verified, stack.unplanned_exits(), traffic.faults,
                              request_timeout_s)
        missing = [kind for kind in faults if kind not in {f.kind for f in traffic.faults}]
        checks["all_faults_injected"] = Check(ok=not missing, failures=len(missing),
                                              examples=[f"never injected (deadline): {missing}"] if missing else [])
        return SoakReport(requests=len(traffic.sent), concurrency=concurrency, wall_s=wall,
                          outcomes=Counter(r.outcome for r in traffic.sent), faults=traffic.faults, checks=checks,
                          audit_entries=sum(len(v) for v in by_request.values()),
                          accepted=sum(1 for v in by_request.values() if _accepted(v)),
                          log_problems=log_problems(stack.logs))
    finally:
        with signals_deferred():
            if stack is not None:
                stack.stop()
            if keep_dir:
                say(f"soak: kept {temp.path} (logs in {temp.path / 'logs'})")
            else:
                temp.__exit__(None, None, None)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests to send, at least (default 3000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--duration", type=float, default=900.0, help="stop sending after this many seconds")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"comma-separated, injected in this order (default: {','.join(FAULT_KINDS)})")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests (0..1)")
    parser.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens asked (default 24)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    args = parser.parse_args(argv)
    args.fault_list = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.fault_list if f not in FAULT_KINDS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULT_KINDS)}")
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 2:
        parser.error("--requests, --concurrency and --duration must be positive, --max-tokens at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _stop_on_sigterm()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = run_soak(requests=args.requests, concurrency=args.concurrency, faults=args.fault_list,
                          duration_s=args.duration, stream_share=args.stream_share, max_tokens=args.max_tokens,
                          keep_dir=args.keep, say=say)
    except KeyboardInterrupt:
        say("soak: interrupted; everything it started has been stopped")
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        say(f"soak: {type(exc).__name__}: {exc}")
        return 1
    print(report.render())
    if args.json:
        print(json.dumps(report.to_document(), sort_keys=True))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
