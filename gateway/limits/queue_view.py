"""What ``GET /v1/models`` says of each model's queue: per team for admins, the caller's own place for others.

One pipelined round trip reads every listed model's state: fair mode, each
model's waiting hash and mean service time plus the shares and the live
workers once; fifo mode, the plain lists' lengths. A non-admin never sees
another team's name or count, only the total, its own team's count and
where a request sent now would stand (``gateway/limits/fair_share.py``).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import redis.asyncio as aioredis

from gateway.limits.fair_share import (estimated_wait_s, position, service_ms, team_field,
                                       team_label)
from workers.contract.queue_layout import queue_keys
from workers.contract.fair_queues import MODE_FAIR, SHARES_KEY, tags_key, waiting_key
from workers.contract.jobs import queue_for
from workers.contract.liveness import WORKERS_KEY, live_slots

#: The role that sees every team's count.
ADMIN_ROLE = "admin"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _number(raw: Any, default: float) -> float:
    try:
        value = float(_text(raw))
    except (TypeError, ValueError):
        return default
    return value if 0 < value < float("inf") else default


async def queue_views(redis: aioredis.Redis, models: Iterable[str], *, team: str | None, admin: bool, limit: int,
                      mode: str) -> dict[str, dict[str, Any]]:
    """Each model's ``queue`` object as the caller may see it; raises ``RedisError`` or ``OSError``."""
    names = list(models)
    if not names:
        return {}
    fair = mode == MODE_FAIR
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            if fair:
                pipe.hgetall(waiting_key(name))
                pipe.hget(tags_key(name), "svc")
            else:
                for key in queue_keys(queue_for(name)):
                    pipe.llen(key)
        if fair:
            pipe.hgetall(SHARES_KEY)
            pipe.zrangebyscore(WORKERS_KEY, f"({int(time.time())}", "+inf")
        replies = await pipe.execute()
    if not fair:
        per_model = len(queue_keys(queue_for(names[0])))
        return {name: {"waiting": sum(replies[i * per_model:(i + 1) * per_model]), "limit": limit}
                for i, name in enumerate(names)}
    shares = {_text(k): _number(v, 0) for k, v in replies[-2].items()}
    default = shares.get("*") or 1.0
    live = live_slots(replies[-1])  # jobs served at once, not workers: a prefork worker has several
    views = {}
    for i, name in enumerate(names):
        waiting = {_text(k): int(_number(v, 0)) for k, v in replies[2 * i].items()}
        waiting = {field: n for field, n in waiting.items() if n > 0}
        views[name] = _fair_view(waiting, shares, default, service_ms(replies[2 * i + 1]), live.get(name, 0),
                                 team=team, admin=admin, limit=limit)
    return views


def _fair_view(waiting: dict[str, int], shares: dict[str, float], default: float, svc_ms: float, live: int, *,
               team: str | None, admin: bool, limit: int) -> dict[str, Any]:
    def weight(field: str) -> float:
        return shares.get(field) or default

    total = sum(waiting.values())
    if admin:
        weights = sum(weight(field) for field in waiting)
        return {"waiting": total, "limit": limit,
                "teams": {team_label(field): {"waiting": n, "share": round(weight(field) / weights, 4)}
                          for field, n in sorted(waiting.items())}}
    own = team_field(team)
    mine = waiting.get(own, 0)
    waiting_weight = sum(weight(field) for field in waiting if field != own) + weight(own)
    place = position(mine, total, weight(own), waiting_weight)
    return {"waiting": total, "limit": limit, "your_team_waiting": mine, "position": place,
            "estimated_wait_s": estimated_wait_s(place, svc_ms, live)}
