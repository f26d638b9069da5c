"""Counting the commands Redis runs, for benches that report "Redis commands per request".

``INFO commandstats`` counts every command Redis executes, those a Lua script
runs through ``redis.call`` included (the ``EVALSHA`` itself counts once
more), so the difference of two readings is the whole cost of what ran in
between, whichever client or script issued it. Other clients of the same
Redis (workers, other benches) are counted too: measure on a private Redis.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping


def _calls(info: Mapping[str, Any]) -> Counter[str]:
    """``{command: calls}`` from a parsed ``INFO commandstats`` reply (redis-py's shape)."""
    calls: Counter[str] = Counter()
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, Mapping):
            calls[key[len("cmdstat_"):].lower()] = int(value["calls"])
    return calls


def command_calls(client: Any) -> Counter[str]:
    """Calls per command so far, from a synchronous redis-py client."""
    return _calls(client.info("commandstats"))


async def command_calls_async(client: Any) -> Counter[str]:
    """Calls per command so far, from a ``redis.asyncio`` client."""
    return _calls(await client.info("commandstats"))


def commands_since(client: Any, before: Counter[str]) -> Counter[str]:
    """Commands run since ``before`` (a :func:`command_calls` reading), minus this reading's own INFO."""
    return _diff(command_calls(client), before)


async def commands_since_async(client: Any, before: Counter[str]) -> Counter[str]:
    """:func:`commands_since` for a ``redis.asyncio`` client."""
    return _diff(await command_calls_async(client), before)


def _diff(after: Counter[str], before: Counter[str]) -> Counter[str]:
    spent = Counter({name: after[name] - before.get(name, 0) for name in after})
    spent["info"] -= 1  # the reading that produced ``before`` is counted in ``after``
    return +spent  # drop zeros


def per_request(spent: Counter[str], requests: int) -> dict[str, float]:
    """Commands per request, per command, largest first, with ``total``."""
    shares = {name: count / requests for name, count in spent.most_common()}
    return {"total": sum(spent.values()) / requests, **shares}
