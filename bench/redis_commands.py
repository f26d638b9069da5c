"""Redis commands per admitted request on the usage path (counters and queue depth).

Runs on a private Redis what admission and the end of a request ask of it
in the common case (``gateway.requests.admission``: the policy obliges
the limits it obliged last time): ``UsageCounters.admit`` (snapshot,
reservation and queue depth in one script) and ``settle``, for a principal
in a team with every limit set, and prints the commands per request from
``INFO commandstats`` (commands inside Lua scripts included). Three cases:
the model's queue empty; holding waiting messages at the policy's default
priority; and, the queue holding them, a request whose limits admission
could not guess (snapshot, then reserve: two calls). The clock is stepped
0.2 s per request and the measured requests follow a full minute of them,
so admissions also prune the window, as under steady load. Counts, not
timings: the figure does not move with the machine's load. Before the
one-script path (snapshot, reserve, a pipeline of 10 ``LLEN`` and settle)
this printed 108 per request in the same steady state; with a ``ZCOUNT``
per scope for the requests in flight and their slots in sets of their own,
25 (queue holding 3); now 21. The whole request's commands (the broker's and
the worker's too) are counted by ``bench/overhead.py`` and listed in
docs/architecture.md, "Redis commands of one request".

Then the queue, per job, in both ``GOVGATE_QUEUE_MODE``s: the gateway's push
(``gateway/dispatch/queue.py``) of jobs of two teams, and a worker's channel
(``workers/contract/kombu_redis.py``, a real kombu consumer in this process)
taking and acknowledging them all under backlog, each job "served" for
5 ms so the measured service times are even, as a worker's are. Each job
is taken by the take script (``workers/contract/take.py``: the pop and the
unacked bookkeeping in one step). In fair mode that adds the push
script's bookkeeping, the take's ordering and charge, and its
once-a-second recount (the run lasts a few seconds, so the recount
shows at about its real rate). It also prints the CPU this process spent
per job taking them, the best of three rounds: the part of the figures that
moves with the machine.

Usage::

    .venv/bin/python bench/redis_commands.py [--requests 600]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

if not __package__:  # run as `python bench/redis_commands.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis  # noqa: E402

from bench._commandstats import command_calls_async, commands_since_async, per_request  # noqa: E402
from gateway.limits import Reservation, UsageCounters  # noqa: E402
from gateway.limits.queue import model_queue  # noqa: E402
from govgate.redis_server import RedisProcess  # noqa: E402
from workers.contract.queue_layout import DEFAULT_PRIORITY  # noqa: E402
from workers.contract.jobs import queue_for  # noqa: E402

MODEL = "bench-model"
#: Simulated time between requests; WARMUP requests fill the minute window first.
STEP_S = 0.2
WARMUP = 301
BIG = 10**9
LIMITS = {"principal": {"requests_per_minute": BIG, "tokens_per_minute": BIG, "tokens_per_day": BIG,
                        "tokens_per_month": BIG, "in_flight": BIG},
          "team": {"requests_per_minute": BIG, "tokens_per_minute": BIG, "tokens_per_day": BIG,
                   "tokens_per_month": BIG, "in_flight": BIG}}


async def one_request(counters: UsageCounters, now: float, *, guessed: bool = True) -> None:
    """The usage path of one admitted request that used 60 of the 100 tokens it held.

    ``guessed``: admission knew the limits the policy would oblige (the
    common case); else it reads the snapshot first and reserves after the
    decision, two calls (a principal's first request to a model).
    """
    if not guessed:
        await counters.snapshot("alice", "research", now=now)
    reply = await counters.admit(uuid.uuid4().hex, "alice", "research", LIMITS, 100, now=now,
                                 queue=model_queue(MODEL, 64, DEFAULT_PRIORITY))
    assert isinstance(reply.outcome, Reservation), reply.outcome
    await counters.settle(reply.outcome, 60, now=now)


async def measure(client: aioredis.Redis, requests: int, *, waiting: int, guessed: bool) -> dict[str, float]:
    await client.flushall()
    if waiting:  # messages at the policy's default priority (5)
        await client.rpush(f"{queue_for(MODEL)}:{DEFAULT_PRIORITY}", *[b"x"] * waiting)
    counters = UsageCounters(client, prefix=f"bench:{uuid.uuid4().hex}")
    start = time.time()
    for i in range(WARMUP):  # scripts loaded, keys created, a full minute window
        await one_request(counters, start + STEP_S * i)
    before = await command_calls_async(client)
    for i in range(WARMUP, WARMUP + requests):
        await one_request(counters, start + STEP_S * i, guessed=guessed)
    return per_request(await commands_since_async(client, before), requests)


async def push_jobs(client: aioredis.Redis, mode: str, jobs: int) -> None:
    """``jobs`` jobs of two teams (two principals each) queued as a gateway in ``mode`` queues them."""
    import os

    from gateway.dispatch.queue import Dispatcher
    from workers.contract.jobs import GenerateJob
    from workers.contract.sampling import SamplingParams
    from workers.contract.sealing import Sealer

    dispatcher = Dispatcher(client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)
    for n in range(jobs):
        team = ("alpha", "beta")[n % 2]
        await dispatcher.enqueue(GenerateJob(
            request_id=uuid.uuid4().hex, model=MODEL, endpoint="completions", params=SamplingParams(1),
            principal=f"{team}-{n % 4 // 2}", team=team, policy_revision="r", prompt="x"), priority=None)


def take_jobs(url: str, jobs: int) -> None:
    """A worker's channel consuming ``model.<MODEL>`` until it took and acked ``jobs`` jobs."""
    import socket

    from workers.contract.celery_config import make_celery

    app = make_celery(url)
    taken: list[int] = []

    def on_message(message) -> None:
        time.sleep(0.005)
        message.ack()
        taken.append(1)

    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(queue_for(MODEL), no_ack=False, callback=on_message, consumer_tag="bench")
            while len(taken) < jobs:
                try:
                    connection.drain_events(timeout=5)
                except socket.timeout:
                    raise RuntimeError(f"took {len(taken)} of {jobs} jobs") from None
            channel.basic_cancel("bench")
    finally:
        app.close()


async def measure_queue(client: aioredis.Redis, url: str, mode: str, jobs: int) -> tuple[dict, dict, float]:
    """Commands per job of the push, then of the take (with its ack), in ``mode``; and the CPU (ms) this
    process spent per job taking them (the channel's work, what a worker's main process spends)."""
    await client.flushall()
    await push_jobs(client, mode, 8)  # scripts loaded, lists registered, the service time learnt
    await asyncio.to_thread(take_jobs, url, 8)
    before = await command_calls_async(client)
    await push_jobs(client, mode, jobs)
    pushed = per_request(await commands_since_async(client, before), jobs)
    before = await command_calls_async(client)
    cpu = time.process_time()
    await asyncio.to_thread(take_jobs, url, jobs)
    cpu_ms = (time.process_time() - cpu) * 1000 / jobs
    return pushed, per_request(await commands_since_async(client, before), jobs), cpu_ms


async def main(requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="gg-rc-") as folder:
        server = RedisProcess.start(Path(folder), persist=False)
        client = aioredis.Redis.from_url(server.url)
        try:
            for label, waiting, guessed in (("queue empty", 0, True), ("queue holding 3", 3, True),
                                            ("not guessed", 3, False)):
                figures = await measure(client, requests, waiting=waiting, guessed=guessed)
                detail = ", ".join(f"{name} {value:.2f}" for name, value in figures.items() if name != "total")
                print(f"{label:16s} {figures['total']:6.2f} commands per request  ({detail})")
            jobs = max(100, requests // 2)
            cpu: dict[str, float] = {}
            for mode in ("fifo", "fair"):
                pushed, taken, cpu[mode] = await measure_queue(client, server.url, mode, jobs)
                for part, figures in (("push", pushed), ("take", taken)):
                    detail = ", ".join(f"{name} {value:.2f}" for name, value in figures.items() if name != "total")
                    print(f"{mode} {part:11s} {figures['total']:6.2f} commands per job      ({detail})")
            # CPU, unlike the counts, moves with the machine: the best of three rounds, both modes each round
            for _ in range(2):
                for mode in ("fifo", "fair"):
                    cpu[mode] = min(cpu[mode], (await measure_queue(client, server.url, mode, jobs))[2])
            print(f"worker channel CPU per job (best of 3): fifo {cpu['fifo']:.3f} ms, fair {cpu['fair']:.3f} ms "
                  f"({cpu['fair'] / cpu['fifo']:.2f}x)")
        finally:
            await client.aclose()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    asyncio.run(main(parser.parse_args().requests))
