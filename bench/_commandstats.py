"""Redis commands a measured phase cost, from ``INFO commandstats`` before and after it.

Redis counts a command called from a Lua script under that command's own
name, besides the one ``EVAL``/``EVALSHA`` call (checked on Redis 6.2.14:
one ``EVAL`` running ``INCR``, ``INCR``, ``EXPIRE`` adds 1 to ``eval``,
2 to ``incr`` and 1 to ``expire``). So the total below counts every command
Redis executed, scripted or not, and the per-command breakdown shows both
the script calls and what ran inside them.

The probe's own ``INFO`` calls are left out; everything else that ran in
the phase (a Celery worker's polling and heartbeats included) is the
system's cost and stays in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CommandProbe", "command_calls_async", "command_diff", "commands_since_async", "per_request"]

#: Commands the probe itself sends.
_OWN_COMMANDS = frozenset({"info"})


def _calls(info: dict[str, dict[str, int]]) -> dict[str, int]:
    """{"cmdstat_get": {"calls": 3, …}} -> {"get": 3}; newer Redis names subcommands "client|setname"."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()
            if name.startswith("cmdstat_")}


async def command_calls_async(client: Any) -> dict[str, int]:
    """Calls per command so far, read through a ``redis.asyncio`` client (for probes inside an event loop)."""
    return _calls(await client.info("commandstats"))


async def commands_since_async(client: Any, before: dict[str, int]) -> Counter[str]:
    """Calls per command since ``before`` (a :func:`command_calls_async` reading), the probe's INFO left out.

    A Counter, so a command that did not run reads as 0.
    """
    return Counter(command_diff(before, await command_calls_async(client)))


def per_request(spent: dict[str, int], requests: int) -> dict[str, float]:
    """Commands per request, per command, largest first, with ``total``."""
    ordered = sorted(spent.items(), key=lambda item: (-item[1], item[0]))
    return {"total": sum(spent.values()) / requests, **{name: count / requests for name, count in ordered}}


def command_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two readings, zero rows and the probe's own commands dropped."""
    diff = {name: after[name] - before.get(name, 0) for name in after if name not in _OWN_COMMANDS}
    return dict(sorted(((n, c) for n, c in diff.items() if c > 0), key=lambda item: (-item[1], item[0])))


@dataclass
class CommandProbe:
    """Reads a Redis's commandstats around a phase, over one connection.

    One connection for both readings: it is opened (``HELLO``/``CLIENT
    SETINFO`` and the like) before the first, so the only commands the probe
    adds inside the window are its ``INFO`` calls, which are left out.
    """

    url: str
    before: dict[str, int] = field(default_factory=dict)
    _client: Any = None

    def _read(self) -> dict[str, int]:
        return _calls(self._client.info("commandstats"))

    def start(self) -> None:
        import redis

        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        self.before = self._read()

    def stop(self) -> dict[str, int]:
        """Calls per command since :meth:`start`, most frequent first; the connection is closed."""
        try:
            return command_diff(self.before, self._read())
        finally:
            self._client.close()
            self._client = None
