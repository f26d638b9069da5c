"""Timing the policy bench's operations: a phase runs N of them with C in flight and keeps each latency."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from bench._figures import percentile, rounded

#: The longest one measured phase may take; a stuck engine or Redis ends the run, not hangs it.
PHASE_TIMEOUT_S = 300.0


@dataclass
class Run:
    """One measured phase: how long it took and each operation's latency."""

    count: int
    wall_s: float
    latencies_us: list[float]
    failures: Counter = field(default_factory=Counter)

    @property
    def per_s(self) -> float:
        return self.count / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile (no interpolation: every figure is a latency that happened)."""
        return percentile(self.latencies_us, p)

    def figures(self) -> dict[str, Any]:
        return {"count": self.count, "wall_s": round(self.wall_s, 4), "per_s": round(self.per_s, 1),
                "p50_us": rounded(self.percentile(50)), "p99_us": rounded(self.percentile(99)),
                "failures": dict(self.failures)}


#: One operation of a phase: given its sequence number, do it; return a failure label or None.
Operation = Callable[[int], Awaitable[str | None]]


async def timed(operation: Operation, count: int, concurrency: int) -> Run:
    """Run ``count`` operations with ``concurrency`` in flight, timing each one.

    Coroutines share one iterator of sequence numbers, so the work is the
    same whatever the concurrency; the whole phase is bounded by
    ``PHASE_TIMEOUT_S``.
    """
    latencies: list[float] = []
    failures: Counter = Counter()
    numbers = iter(range(count))

    async def loop() -> None:
        for number in numbers:
            started = time.perf_counter_ns()
            failure = await operation(number)
            latencies.append((time.perf_counter_ns() - started) / 1000)
            if failure:
                failures[failure] += 1

    started = time.perf_counter()
    try:
        # A TaskGroup, not gather: on an error, a timeout or Ctrl-C the coroutines are
        # cancelled and awaited before the caller closes what they are using.
        async with asyncio.timeout(PHASE_TIMEOUT_S), asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(loop())
    except TimeoutError:
        raise TimeoutError(f"{count} operations did not finish within {PHASE_TIMEOUT_S:.0f}s") from None
    return Run(count=count, wall_s=time.perf_counter() - started, latencies_us=latencies, failures=failures)


async def sequential_and_concurrent(operation: Operation, args: argparse.Namespace, count: int) -> dict[str, Run]:
    """Warm up (unmeasured), then one sequential and one concurrent phase."""
    await timed(operation, args.warmup, min(args.concurrency, max(args.warmup, 1)))
    return {"sequential": await timed(operation, count, 1),
            "concurrent": await timed(operation, count, args.concurrency)}
