"""One gateway-like process firing reserve calls at once (for the RPM test).

Run as ``python -m tests._rpm_probe URL PREFIX PRINCIPAL LIMIT COUNT START_AT``.
It waits until the wall clock reaches START_AT so that two such processes
fire together, then sends COUNT concurrent reserves with the real clock and
prints one JSON line: how many were reserved and the refusals' limit names.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import redis.asyncio as aioredis

from gateway.limits import Refusal, UsageCounters


async def fire(url: str, prefix: str, principal: str, limit: int, count: int, start_at: float) -> dict:
    # Pooled like the gateway's client: a plain pool refuses the 101st
    # concurrent command (MaxConnectionsError); a blocking one makes it wait.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=10)
    client = aioredis.Redis.from_pool(pool)
    try:
        counters = UsageCounters(client, prefix=prefix)
        await client.ping()  # connect before the start line, not after it
        await asyncio.sleep(max(0.0, start_at - time.time()))
        limits = {"principal": {"requests_per_minute": limit}}
        results = await asyncio.gather(*(
            counters.reserve(uuid.uuid4().hex, principal, None, limits, 1) for _ in range(count)))
    finally:
        await client.aclose()
    refusals = [r for r in results if isinstance(r, Refusal)]
    return {"reserved": len(results) - len(refusals), "refused": [r.limit_name for r in refusals],
            "finished_after_s": round(time.time() - start_at, 3)}


def main(argv: list[str]) -> None:
    url, prefix, principal, limit, count, start_at = argv
    report = asyncio.run(fire(url, prefix, principal, int(limit), int(count), float(start_at)))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
