"""The stack ``bench/fairness.py`` measures: one Redis, ONE tiny-model worker, one gateway per queue mode.

Both gateways share the Redis, the database and the one worker (concurrency
1), so FIFO and fair share are measured against the very same worker and
the phases can alternate without a restart; the worker consumes the plain
and the fair lists whatever mode a gateway pushes in. Each bench team gets
one principal with an API key (role ``analyst``), no usage limits (the
shipped 120 requests a minute or 8 in flight would turn a burst of 200 into
a measurement of 429s) and its ``share`` in the copied policy's
``govgate_config.teams``; ``GOVGATE_MAX_QUEUED_PER_MODEL`` is raised so
every burst fits the queue.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._stack import HEALTH_PATH, HOST, LOG_LEVEL, ROOT, free_port, spawn, stop_later

__all__ = ["FairStack", "Team", "fair_mode_available", "start_fair_stack", "team_policy_dir"]

#: Room in the model's queue: every team's burst at once, with some to spare.
MAX_QUEUED = 5000
#: The role of every bench principal: a shipped role that may use the tiny model, at the default priority.
ROLE = "analyst"


@dataclass(frozen=True)
class Team:
    """A bench team: its name, its weight in the policy, and its one principal."""

    name: str
    share: float

    @property
    def principal(self) -> str:
        return f"{self.name}-user"


def fair_mode_available() -> bool:
    """This checkout has ``GOVGATE_QUEUE_MODE`` (the fair queue core); without it every gateway is FIFO."""
    from gateway.settings import Settings

    return "queue_mode" in Settings.__dataclass_fields__


def team_policy_dir(var_dir: Path, teams: list[Team]) -> Path:
    """The shipped policy, each bench team and principal without usage limits and with its share."""
    target = var_dir / "policies"
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("*_test.rego"))
    data_file = target / "data.json"
    document = json.loads(data_file.read_text())
    config = document["govgate_config"]
    limits = config.setdefault("limits", {})
    configured_teams = config.setdefault("teams", {})
    for team in teams:
        limits.setdefault("principals", {})[team.principal] = {}
        limits.setdefault("teams", {})[team.name] = {}
        configured_teams[team.name] = {"share": team.share}
    data_file.write_text(json.dumps(document, indent=2))
    return target


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


def _create_keys(settings: Any, teams: list[Team]) -> dict[str, str]:
    from gateway.auth import KeyStore
    from gateway.components import open_database

    engine = open_database(settings)
    try:
        store = KeyStore(engine)
        return {team.name: store.create(team.principal, team=team.name, roles=[ROLE],
                                        note="bench/fairness.py").secret for team in teams}
    finally:
        engine.dispose()


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
    keys = _create_keys(config, teams)
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
