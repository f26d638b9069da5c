"""Redis time of one fair-share pick, against how many lists a model has registered.

Each job a worker takes in fair mode runs the pick script once
(``workers/contract/fair_order.py``): it charges the job, applies a
correction and returns the order of every list registered for the model,
so its cost grows with the teams' and principals' lists active in the last
minutes (README, "Not yet"). This bench fills a private Redis with a
registry of N lists (ten principals a team, one priority each, a job
waiting on each, every tag set), runs the script the way a worker does (a
pop and one correction per call) and prints Redis's own time per call from
``INFO commandstats`` (``evalsha``, which includes the commands the script
runs), and the commands inside it. Counts and Redis time, not this
process's clock: the figure moves with the machine, not with the client.

Usage::

    .venv/bin/python bench/fair_pick.py [--lists 4 20 100 200] [--picks 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/fair_pick.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "bench-pick"
#: Principals per team in the registry the bench builds.
PRINCIPALS_PER_TEAM = 10


def registry(lists: int) -> list[str]:
    """``lists`` fair list names: teams of ten principals, each principal one list at priority 4."""
    from workers.contract.fair_queues import fair_queue

    names = [fair_queue(MODEL, f"team-{i // PRINCIPALS_PER_TEAM}", f"principal-{i}") + ":4" for i in range(lists)]
    return names


def fill(client: Any, names: list[str], now: float, picks: int) -> None:
    """The model's registry, a job on every list, every tag, equal shares, and waiting counts that ``picks``
    charges do not run down (as under a steady backlog, where pushes keep up with picks)."""
    from workers.contract.fair_queues import SHARES_KEY, parse_fair_queue, registry_key, tags_key, waiting_key

    client.flushdb()
    client.zadd(registry_key(MODEL), {name: now for name in names})
    tags: dict[str, float] = {"V": 1.0, "svc": 3.0, "rc": now}
    waiting: dict[str, int] = {}
    for name in names:
        client.lpush(name, "job")
        fair = parse_fair_queue(name.rsplit(":", 1)[0])
        assert fair is not None
        tags[f"t:{fair.team}"] = 1.0
        tags[f"v:{fair.team}"] = 1.0
        tags[f"p:{fair.team}/{fair.principal}"] = 1.0
        waiting[fair.team] = picks + 1
    client.hset(tags_key(MODEL), mapping=tags)
    client.hset(waiting_key(MODEL), mapping=waiting)
    client.hset(SHARES_KEY, mapping={"*": 1})


def measure(client: Any, lists: int, picks: int) -> dict[str, Any]:
    """Redis µs per pick over ``picks`` calls on a registry of ``lists`` lists, and the commands inside."""
    from workers.contract import fair_order

    names = registry(lists)
    fill(client, names, time.time(), picks)
    fair_order.load_script(client)
    client.config_resetstat()
    for i in range(picks):
        fair_order.pick(client, MODEL, popped=names[i % lists], corrections=[(names[(i + 1) % lists], 3.0, 3.0)])
    stats = client.info("commandstats")
    evalsha = stats["cmdstat_evalsha"]
    inside = {name.removeprefix("cmdstat_"): round(row["calls"] / picks, 2) for name, row in stats.items()
              if name not in ("cmdstat_evalsha", "cmdstat_config")}
    return {"lists": lists, "picks": picks, "redis_us_per_pick": round(evalsha["usec"] / picks, 1),
            "commands_per_pick": inside}


def run(lists: list[int], picks: int, write=print) -> list[dict[str, Any]]:
    import redis

    from govgate.redis_server import RedisProcess

    with tempfile.TemporaryDirectory(prefix="gg-pick-") as folder:
        server = RedisProcess.start(Path(folder) / "redis", persist=False)
        client = redis.Redis.from_url(server.url)
        try:
            rows = [measure(client, n, picks) for n in lists]
        finally:
            client.close()
            server.stop()
    write(f"fair pick, {picks} picks per registry ({PRINCIPALS_PER_TEAM} principals a team, one list each)")
    write(f"{'lists':>6}  {'Redis us/pick':>13}  commands inside, per pick")
    for row in rows:
        inside = ", ".join(f"{k} {v:g}" for k, v in sorted(row["commands_per_pick"].items()))
        write(f"{row['lists']:>6}  {row['redis_us_per_pick']:>13.1f}  {inside}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lists", type=int, nargs="+", default=[4, 20, 100, 200], help="registry sizes")
    parser.add_argument("--picks", type=int, default=2000, help="picks per registry size")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.picks < 1 or min(args.lists) < 2:
        parser.error("--picks must be at least 1 and every --lists at least 2 (a pop and a correction)")
    rows = run(args.lists, args.picks)
    if args.json:
        args.json.write_text(json.dumps({"picks": args.picks, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
