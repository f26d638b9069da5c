"""How much does governance cost per request? (``make bench``)

Starts a private govgate stack (Redis, one worker for the tiny model, the API
under uvicorn) in a temporary folder, and a bare Litestar app under the same
uvicorn settings (``bench/_bare.py``). Then, ``--rounds`` times (default 2),
each side in turn, bare first:

* a c=32 phase: ``--requests`` requests, 32 in flight, with the CPU of every
  server process read from ``/proc`` before and after (``bench/_cpu.py``),
  split by process (gateway, its policy evaluators, the Celery main process,
  its pool children, Redis), and Redis ``INFO commandstats`` read around it
  (``bench/_commandstats.py``);
* a c=1 phase: one request at a time, for the latency a lone user sees.

Requests ask for one token at temperature 0, so what is measured is the
gateway's path (auth, policy, audit, queue, result hand-back), not
generation. Each side's figures come from its better round
(``bench/overhead_report.py`` says which figure comes from where).

Why both stacks stay up and take turns rather than being started and
stopped per round: starting govgate costs seconds of CPU each time, and
an idle stack costs next to nothing; the table prints what the idle side
spent during the other's phases, so a reader can check that claim. The
rounds interleave so that a slow spell on the machine hits both sides.

The load comes from ``bench/_load.py``, a raw-asyncio HTTP/1.1 client with
kept-alive connections, light enough that the bare server, not the client,
is what is measured; the client's own CPU per request is printed too.
Absolute figures move with whatever else the machine does; the ratios are
the figures to watch. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/overhead.py [--requests 1000] [--c1-requests 200] [--concurrency 32]
        [--warmup 64] [--rounds 2] [--quick] [--json FILE]

Everything started here listens on loopback or a unix socket and is stopped
at the end, also on Ctrl-C, SIGTERM or an error; if this process is killed
outright, its children receive SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/overhead.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._bare import CHAT_PATH  # noqa: E402
from bench._commandstats import CommandProbe  # noqa: E402
from bench._cpu import Role, RoleProbe  # noqa: E402
from bench._figures import write_json  # noqa: E402
from bench._load import REQUEST_TIMEOUT_S, Endpoint, run_phase  # noqa: E402
from bench._stack import (  # noqa: E402
    HEALTH_PATH,
    HOST,
    Running,
    free_port,
    in_temp_dir,
    run_interruptible,
    say,
    spawn,
    start_govgate,
    stop_later,
)
from bench.overhead_report import SideRun, report, table  # noqa: E402

#: The longest one measured phase may take; a stuck stack ends the run, not hangs it.
PHASE_TIMEOUT_S = 300.0
#: Requests at c=1 before the measured c=1 phase (connection and caches warm).
C1_WARMUP = 8


@dataclass
class Side:
    """One started server: where to send, which processes are its CPU, where its Redis is."""

    name: str
    endpoint: Endpoint
    roles: list[Role]
    redis_url: str | None = None


def request_body() -> dict[str, Any]:
    """One token, greedy: the cheapest request the worker can answer."""
    from workers.contract.registry import TINY_MODEL_NAME

    return {"model": TINY_MODEL_NAME, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello in one word."}]}


def start_govgate_side(var_dir: Path, stops: contextlib.ExitStack, **settings: Any) -> Side:
    """Redis, one tiny-model worker, ``govgate serve``, and an admin key.

    ``settings`` are further gateway settings (``--queue-mode``, ``--output-rules``,
    ``--admission-concurrency``): what one part of the governed path costs is the
    difference between runs with it on and off.
    """
    from workers.contract.registry import TINY_MODEL_NAME

    running = start_govgate(var_dir, [TINY_MODEL_NAME], note="bench/overhead.py", request_timeout_s=REQUEST_TIMEOUT_S,
                            **settings)
    stop_later(stops, running.stack.stop)
    stack = running.stack
    api, worker, redis = stack.api.pid, stack.workers[TINY_MODEL_NAME].pid, stack.redis.process.pid
    roles = [Role("gateway", api, "own"), Role("evaluators", api, "children"),
             Role("worker_main", worker, "own"), Role("worker_pool", worker, "children"), Role("redis", redis)]
    return Side("govgate", Endpoint.post_json(running.base_url, CHAT_PATH, request_body(), running.headers),
                roles, redis_url=stack.redis.url)


def start_bare_side(var_dir: Path, stops: contextlib.ExitStack) -> Side:
    """The bare Litestar app in its own uvicorn process (``python -m bench._bare PORT``)."""
    from govgate.stack import Stack, wait_for_api

    port = free_port(HOST)
    running = Running(base_url=f"http://{HOST}:{port}", headers={}, stack=Stack(
        api=spawn(["-m", "bench._bare", str(port)], dict(os.environ), var_dir / "baseline.log")))
    stop_later(stops, running.stack.stop)
    wait_for_api(running.base_url + HEALTH_PATH, running.stack)
    return Side("bare litestar", Endpoint.post_json(running.base_url, CHAT_PATH, request_body(), {}),
                [Role("server", running.stack.api.pid)])


async def measure_round(side: Side, other: Side, args: argparse.Namespace) -> SideRun:
    """Warm-up, the c=32 phase with CPU and Redis probes around it, then the c=1 phase."""
    probe, idle = RoleProbe(side.roles), RoleProbe(other.roles)
    commands = CommandProbe(side.redis_url) if side.redis_url else None
    read: dict[str, Any] = {}

    def on_start() -> None:
        if commands:
            commands.start()
        idle.start()
        probe.start()

    def on_stop() -> None:
        read["cpu"] = probe.stop()
        read["idle"] = idle.stop()
        read["commands"] = commands.stop() if commands else None

    if args.warmup:
        await run_phase(side.endpoint, args.warmup, args.concurrency, phase_timeout_s=PHASE_TIMEOUT_S)
    c32 = await run_phase(side.endpoint, args.requests, args.concurrency, on_start=on_start, on_stop=on_stop,
                          phase_timeout_s=PHASE_TIMEOUT_S)
    await run_phase(side.endpoint, C1_WARMUP, 1, phase_timeout_s=PHASE_TIMEOUT_S)
    c1 = await run_phase(side.endpoint, args.c1_requests, 1, phase_timeout_s=PHASE_TIMEOUT_S)
    return SideRun(c32=c32, cpu_s=read["cpu"], c1=c1, commands=read["commands"],
                   other_side_cpu_s=sum(read["idle"].values()))


def measure(args: argparse.Namespace, var_dir: Path) -> dict[str, list[SideRun]]:
    """Start both sides, run the interleaved rounds, stop both."""
    runs: dict[str, list[SideRun]] = {"govgate": [], "bare litestar": []}
    with contextlib.ExitStack() as stops:
        say("govgate: starting redis, a tiny-model worker and the api …")
        gov = start_govgate_side(var_dir, stops, **path_settings(args))
        say("bare litestar: starting …")
        bare = start_bare_side(var_dir, stops)
        for number in range(1, args.rounds + 1):
            for side, other in ((bare, gov), (gov, bare)):
                say(f"round {number}/{args.rounds}, {side.name}: {args.warmup} warm-up + {args.requests} at "
                    f"c={args.concurrency}, then {args.c1_requests} at c=1")
                runs[side.name].append(asyncio.run(measure_round(side, other, args)))
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 1000 by default: CPU is read in 10 ms ticks, and the bare server spends well under 1 ms a request.
    parser.add_argument("--requests", type=int, default=1000, help="measured requests at c=32 per side and round")
    parser.add_argument("--c1-requests", type=int, default=200, help="measured requests at c=1 per side and round")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in the loaded phase")
    parser.add_argument("--warmup", type=int, default=64, help="unmeasured requests before each loaded phase")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the better one counts")
    parser.add_argument("--quick", action="store_true", help="a short run: 300 / 50 requests, 32 warm-up")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--queue-mode", choices=("fair", "fifo"), help="GOVGATE_QUEUE_MODE of the gateway "
                        "(default: the setting's default)")
    parser.add_argument("--output-rules", choices=("on", "off"), help="GOVGATE_OUTPUT_RULES of the gateway "
                        "(default: the setting's default)")
    parser.add_argument("--worker-pool", choices=("prefork", "solo"), help="GOVGATE_WORKER_POOL of the workers "
                        "(default: the setting's default)")
    parser.add_argument("--handover-on-take", choices=("on", "off"), help="GOVGATE_HANDOVER_ON_TAKE of the "
                        "workers (default: the setting's default)")
    parser.add_argument("--admission-concurrency", type=int, metavar="N",
                        help="GOVGATE_ADMISSION_CONCURRENCY of the gateway (0: no gate; default: the setting's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.c1_requests, args.warmup = min(args.requests, 300), min(args.c1_requests, 50), 32
    if min(args.requests, args.c1_requests, args.concurrency, args.rounds) < 1 or args.warmup < 0:
        parser.error("--requests, --c1-requests, --concurrency and --rounds must be at least 1, --warmup at least 0")
    if args.admission_concurrency is not None and args.admission_concurrency < 0:
        parser.error("--admission-concurrency must be at least 0")
    return args


def path_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The gateway settings the command line chose (only those given: the rest keep their defaults)."""
    chosen: dict[str, Any] = {}
    if getattr(args, "queue_mode", None) is not None:
        chosen["queue_mode"] = args.queue_mode
    if getattr(args, "output_rules", None) is not None:
        chosen["output_rules"] = args.output_rules == "on"
    if getattr(args, "admission_concurrency", None) is not None:
        chosen["admission_concurrency"] = args.admission_concurrency
    if getattr(args, "worker_pool", None) is not None:
        chosen["worker_pool"] = args.worker_pool
    if getattr(args, "handover_on_take", None) is not None:
        chosen["handover_on_take"] = args.handover_on_take == "on"
    return chosen


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"requests": args.requests, "c1_requests": args.c1_requests, "concurrency": args.concurrency,
            "warmup": args.warmup, "rounds": args.rounds, "max_tokens": 1, "cpu_cores": os.cpu_count(),
            **path_settings(args)}


def run(args: argparse.Namespace, write: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Measure, print the table, write the JSON; the document, or None when a part failed."""
    from govgate.redis_server import RedisUnavailable
    from govgate.stack import StartupError

    runs = in_temp_dir(lambda var_dir: measure(args, var_dir), (StartupError, RedisUnavailable, TimeoutError, OSError))
    if runs is None:
        return None
    document = report(runs["govgate"], runs["bare litestar"], settings_of(args))
    write(f"c={args.concurrency}: {args.requests} requests, c=1: {args.c1_requests} requests, per side and round; "
          f"{args.rounds} interleaved rounds, the better counts; max_tokens 1; {os.cpu_count()} CPUs")
    write(table(document))
    if args.json:
        write_json(args.json, document)
    return document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_interruptible(lambda: 0 if run(args) is not None else 1)


if __name__ == "__main__":
    sys.exit(main())
