"""The soak's stack: Redis, workers and gateways it starts, breaks and restarts.

Kept apart from ``soak.py`` (traffic, checks, report) so each reads on its
own. Every child is started with the same helpers as the other benches
(:mod:`bench._stack`) and ``govgate up`` (``child_env``, ``RedisProcess``,
``govgate worker``/``serve``). Its policy copy and keys are the fairness
bench's (:mod:`bench._teams`): a principal in each of the soak's teams, each
team with its share, so that fair jobs of two teams share the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._stack import HEALTH_PATH, HOST, free_port, spawn
from bench._teams import Team, create_team_keys, team_policy_dir
from govgate.processes import stop_process

#: Longest wait for one process to start and answer.
START_TIMEOUT_S = 120.0


class SoakStack:
    """Redis, workers and gateways the soak starts, breaks and restarts.

    Every process ever started is remembered, so :meth:`stop` leaves none
    behind; those the soak killed on purpose are remembered too, so an exit
    nobody asked for can be told apart.
    """

    def __init__(self, var_dir: Path, *, workers: int, gateways: int, request_timeout_s: float,
                 generation_limit_s: float, redelivery_margin_s: float, teams: list[Team],
                 log_level: str = "INFO", worker_pool: str | None = None, give_way: bool | None = None,
                 database_url: str | None = None) -> None:
        from gateway.settings import Settings
        from workers.contract.registry import TINY_MODEL_NAME

        self.var_dir = var_dir
        self.logs = var_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis: Any = None
        self.worker_count = workers
        self.workers: list[subprocess.Popen] = []
        self.gateways: list[subprocess.Popen] = []
        self.ports = [free_port(HOST) for _ in range(gateways)]
        self.planned_exits: set[int] = set()
        #: When the last fault's victim was gone (``time.monotonic()``); set by each fault.
        self.down_at: float | None = None
        #: Faults run here, one thread for the stack's whole life: Linux sends a child its
        #: PR_SET_PDEATHSIG when the *thread* that forked it ends, so a process restarted
        #: from a short-lived thread (asyncio.to_thread) would be stopped when that thread is.
        self.fault_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soak-faults")
        self._spawned: list[subprocess.Popen] = []
        self._starts: Counter = Counter()
        self.teams = list(teams)
        options: dict[str, Any] = {"worker_pool": worker_pool} if worker_pool else {}
        if give_way is not None:
            options["fair_give_way"] = give_way
        if database_url:
            options["database_url"] = database_url
        self.settings = Settings(var_dir=var_dir, policy_dir=team_policy_dir(var_dir, self.teams), host=HOST,
                                 port=self.ports[0], log_level=log_level, request_timeout_s=request_timeout_s,
                                 generation_time_limit_s=generation_limit_s, redelivery_margin_s=redelivery_margin_s,
                                 **options)
        #: Team name -> the API key secret of its principal.
        self.keys: dict[str, str] = {}
        self.model = TINY_MODEL_NAME

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def start(self) -> None:
        """Redis, the API keys, the workers, the gateways; each waited for (call :meth:`stop` also on failure)."""
        self._start_redis()
        self.settings = self.settings.with_(redis_url=self.redis.url)
        self.keys = create_team_keys(self.settings, self.teams, "bench/soak.py")
        for _ in range(self.worker_count):
            self.workers.append(self._spawn_worker())
        # The gateways need neither worker to start: all of them start together, each then waited for.
        self.gateways = [self._spawn_gateway(i) for i in range(len(self.ports))]
        for process in self.workers:
            self._wait_worker(process)
        for i in range(len(self.ports)):
            self._wait_gateway(i)

    def _env(self, port: int | None = None) -> dict[str, str]:
        from govgate.supervisor import child_env

        settings = self.settings if port is None else self.settings.with_(port=port)
        return child_env(settings, self.redis.url)

    def _log(self, name: str) -> Path:
        self._starts[name] += 1
        return self.logs / f"{name}-{self._starts[name]}.log"

    def _start_redis(self) -> None:
        from govgate.redis_server import RedisProcess

        self.redis = RedisProcess.start(self.var_dir / "redis", persist=True)
        self._spawned.append(self.redis.process)

    def _spawn_worker(self) -> subprocess.Popen:
        from workers.contract.registry import TINY_MODEL_NAME

        process = spawn(["-m", "govgate.cli", "worker", "--model", TINY_MODEL_NAME], self._env(),
                        self._log("worker"))
        self._spawned.append(process)
        return process

    def _wait_worker(self, process: subprocess.Popen) -> None:
        """Until this very worker answers a Celery ping.

        The ping names its node (``<model>.<pid>@<host>``, workers/runtime.py) and stops at its reply:
        a ping to all waits its whole timeout for replies that may still come (each start and restart).
        """
        import socket

        import kombu.exceptions
        import redis

        from workers.contract.celery_config import make_celery

        app = make_celery(self.redis.url)
        node = f"{self.model}.{process.pid}@{socket.gethostname()}"
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"worker {process.pid} exited with {process.returncode} while starting")
                try:
                    replies = app.control.ping(destination=[node], timeout=0.5, limit=1) or []
                except (OSError, redis.RedisError, kombu.exceptions.KombuError):
                    time.sleep(0.2)
                    continue
                if any(node in reply for reply in replies):
                    return
        finally:
            app.close()
        raise TimeoutError(f"worker {process.pid} did not answer within {START_TIMEOUT_S:.0f}s")

    def _spawn_gateway(self, index: int) -> subprocess.Popen:
        process = spawn(["-m", "govgate.cli", "serve"], self._env(self.ports[index]), self._log(f"gateway{index}"))
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

    def gave_way(self) -> int | None:
        """The count of fair jobs that gave way at their start (``gw`` in the model's tags hash); None when
        Redis does not answer. Kept in Redis, so it survives a Redis restart (the append-only file), except
        for the last second's counts before a SIGKILL (``appendfsync everysec``)."""
        import redis

        from workers.contract.fair_queues import tags_key
        from workers.contract.repick import GAVE_WAY_FIELD

        try:
            with redis.Redis.from_url(self.redis.url, socket_timeout=5) as client:
                return int(client.hget(tags_key(self.model), GAVE_WAY_FIELD) or 0)
        except redis.RedisError:
            return None

    # -- faults (blocking; run in a thread) --------------------------------

    def kill_worker(self, index: int = 0) -> tuple[str, float]:
        """SIGKILL a whole worker and its pool at once (no chance to hand tasks back), start another."""
        victim = self.workers[index]
        children = _children(victim.pid)
        for pid in [victim.pid, *children]:
            self.planned_exits.add(pid)
            _kill(pid)
        victim.wait()
        started = self.down_at = time.monotonic()
        self.workers[index] = self._spawn_worker()
        self._wait_worker(self.workers[index])
        return f"worker {victim.pid} and pool {children}", time.monotonic() - started

    def kill_pool_child(self, index: int = 0) -> tuple[str, float | None]:
        """SIGKILL one pool process of a worker; Celery forks a new one (nothing to restart here).

        With the solo pool (the default) the job runs in the worker itself: the process that dies with a
        crashed generation is the worker, which is started again (as ``govgate up`` or compose would)."""
        if self.settings.worker_pool == "solo":
            detail, restart = self.kill_worker(index)
            return f"solo pool, so the whole {detail}", restart
        children = _children(self.workers[index].pid)
        if not children:
            return "no pool process found", None
        self.planned_exits.add(children[0])
        _kill(children[0])
        self.down_at = time.monotonic()
        return f"pool process {children[0]} of worker {self.workers[index].pid}", None

    def restart_redis(self, sig: int, down_s: float) -> tuple[str, float]:
        """Stop Redis with ``sig``, leave it down ``down_s``, start it on the same socket and data."""
        process = self.redis.process
        self.planned_exits.add(process.pid)
        stop_process(process, timeout_s=15, sig=sig)
        self.down_at = time.monotonic()
        time.sleep(down_s)
        started = time.monotonic()
        self._start_redis()
        return f"redis down {down_s:g}s ({signal.Signals(sig).name})", time.monotonic() - started

    def restart_gateway(self, index: int, sig: int) -> tuple[str, float]:
        """Stop gateway ``index`` with ``sig`` and start it again on the same port."""
        process = self.gateways[index]
        self.planned_exits.add(process.pid)
        stop_process(process, timeout_s=30, sig=sig)
        started = self.down_at = time.monotonic()
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
            if self.settings.worker_pool == "prefork" and worker.poll() is None and not _children(worker.pid):
                found.append(f"worker {worker.pid} has no pool process")
        return found

    def stop(self) -> None:
        """Gateways, then workers, then Redis; anything else ever started is killed."""
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
