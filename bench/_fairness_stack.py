"""The stack ``bench/fairness.py`` measures: one Redis, ONE tiny-model worker, one gateway per queue mode.

Both gateways share the Redis, the database and the one worker (concurrency
1), so FIFO and fair share are measured against the very same worker and
the phases can alternate without a restart; the worker consumes the plain
and the fair lists whatever mode a gateway pushes in. Each bench team gets
one principal with an API key (role ``analyst``), no usage limits and its
``share`` in the copied policy's ``govgate_config.teams``
(:mod:`bench._teams`, shared with the soak); ``GOVGATE_MAX_QUEUED_PER_MODEL``
is raised so every burst fits the queue.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._stack import HEALTH_PATH, HOST, LOG_LEVEL, free_port, spawn, stop_later
from bench._teams import Team, create_team_keys, team_policy_dir

__all__ = ["FairStack", "Team", "fair_mode_available", "start_fair_stack", "team_policy_dir"]

#: Room in the model's queue: every team's burst at once, with some to spare.
MAX_QUEUED = 5000


def fair_mode_available() -> bool:
    """This checkout has ``GOVGATE_QUEUE_MODE`` (the fair queue core); without it every gateway is FIFO."""
    from gateway.settings import Settings

    return "queue_mode" in Settings.__dataclass_fields__


@dataclass
class FairStack:
    """Where each mode's gateway listens, each team's key, and the database the audit is read from."""

    base_urls: dict[str, str]  # queue mode -> base URL
    keys: dict[str, str]  # team name -> API key secret
    database_url: str
    redis_url: str
    redis_pid: int
    worker_pid: int
    gateway_pids: dict[str, int]  # queue mode -> pid of its ``govgate serve``


def start_fair_stack(var_dir: Path, teams: list[Team], modes: list[str], stops: contextlib.ExitStack,
                     **settings: Any) -> FairStack:
    """Redis, one tiny-model worker at concurrency 1, and a ``govgate serve`` per mode in ``modes``.

    Everything started is stopped by ``stops`` (gateways first, then the
    worker, then Redis), also when a later step fails.
    """
    from gateway.settings import Settings
    from govgate.redis_server import RedisProcess
    from govgate.stack import Stack, wait_for_api, wait_for_workers
    from govgate.supervisor import child_env
    from workers.contract.registry import TINY_MODEL_NAME

    stack = Stack()
    stop_later(stops, stack.stop)  # Redis and the worker; the gateways are stopped before them
    stack.redis = RedisProcess.start(var_dir / "redis", persist=False)
    config = Settings(var_dir=var_dir, redis_url=stack.redis.url, policy_dir=team_policy_dir(var_dir, teams),
                      host=HOST, port=free_port(HOST), log_level=LOG_LEVEL, max_queued_per_model=MAX_QUEUED,
                      **settings)
    keys = create_team_keys(config, teams, "bench/fairness.py")
    env = child_env(config, stack.redis.url)
    stack.workers[TINY_MODEL_NAME] = spawn(["-m", "govgate.cli", "worker", "--model", TINY_MODEL_NAME,
                                            "--concurrency", "1"], env, var_dir / "worker.log")
    wait_for_workers(stack.redis.url, [TINY_MODEL_NAME], stack, timeout_s=120)
    base_urls, gateway_pids = {}, {}
    for mode in modes:
        port = free_port(HOST)
        gateway = Stack(api=spawn(["-m", "govgate.cli", "serve"],
                                  {**env, "GOVGATE_PORT": str(port), "GOVGATE_QUEUE_MODE": mode},
                                  var_dir / f"serve-{mode}.log"))
        stop_later(stops, gateway.stop)
        base_urls[mode], gateway_pids[mode] = f"http://{HOST}:{port}", gateway.api.pid
        wait_for_api(base_urls[mode] + HEALTH_PATH, gateway)
    return FairStack(base_urls=base_urls, keys=keys, database_url=config.effective_database_url,
                     redis_url=stack.redis.url, redis_pid=stack.redis.process.pid,
                     worker_pid=stack.workers[TINY_MODEL_NAME].pid, gateway_pids=gateway_pids)
