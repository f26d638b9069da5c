"""Does one worker serve teams fairly? FIFO against fair share, in one run (issue 12, "Measured").

Starts a private stack (``bench/_fairness_stack.py``): Redis, ONE tiny-model
worker at concurrency 1, and one ``govgate serve`` per queue mode
(``GOVGATE_QUEUE_MODE=fifo`` and ``fair``) sharing that worker, the Redis
and the database. Each team has one principal, no usage limits and its
``share`` in the policy's data. Three scenarios, each in three phases:

* ``equal``: teams ``eq-a`` and ``eq-b``, weights 1:1 (the issue's case);
* ``weights_3_1``: ``w31-a`` 3, ``w31-b`` 1;
* ``three_teams``: ``tri-a`` 2, ``tri-b`` 1, ``tri-c`` 1.

The **latency phase**: the first team sends ``--burst`` requests at once
(each on its own connection, opened beforehand); every other team sends one
request every ``--every-ms`` until the burst is answered (or for
``--trickle-s``). Figures: the trickling teams' queue waits (p50/p95), how
long the gateway held their requests before queueing them and their
latency at the client, one job's service time, throughput over the burst,
each team's share of all worker time. The **latency_queued phase** is the
same, except that the trickle starts once the audit holds the whole burst:
the gateway admits requests in the order they came, so during the burst
the trickle's requests wait behind it in the gateway and reach the queue
in a clump; starting later shows the worker's schedule alone. The
**shares phase**: the first team sends ``--burst`` at
once; as soon as the audit holds all of them (they are queued), every other
team sends ``--burst`` at once (``--stagger-ms`` later, 0 by default). So
all are backlogged together, and under FIFO the late teams wait behind the
whole first burst however fast the gateway admitted it: each team's share
of the worker's time while all are backlogged, and the share error against
the weights.

Each phase runs against the FIFO gateway and the fair one back to back,
alternating which goes first, ``--repeat`` times. How the figures are made
from the audit trail's terminal entries (``timings.queue_ms``,
``timings.generate_ms``, ``created_at``, the team column) is in
``bench/_fairness_figures.py``'s docstring; waits are pooled over the
repeats, shares summed over them (seconds of worker time), throughput taken
per repeat and the fair/FIFO ratio reported as the median over the
repeats. CPU per job (worker main process, pool, Redis, the gateway in use)
is read from ``/proc`` around each phase: the machine is shared, and CPU
time is less noisy than wall time.

Why ``--max-tokens`` 16 and not 1: on a two-core machine the gateway
spends about as much CPU admitting a request (7-10 ms, connection
included) as the worker takes to serve a one-token job, so a "burst" of
one-token jobs hardly builds a queue (the gateway feeds the worker about
as fast as it drains) and FIFO would look fair. Sixteen tokens of the tiny
model make a job's service about twice its admission (13-21 ms measured),
so the burst waits in the queue as it would in front of a real model,
while a run stays short. On the faster, quiet VM of 2026-11-30's evening
that no longer holds: sixteen tokens take 1.6-2.0 ms of generation and the
worker's hand-over between jobs 2.0-2.6 ms (printed as "hand-over between
jobs"), against about 5 ms of gateway CPU per request, so the machine, not
the worker, is the bottleneck while a burst is admitted, and B's longest
waits are its first jobs, queued while the gateway admits A's burst and
the worker's processes wait for a core (``--schedule-json`` shows each
job; docs/architecture.md, "Fair share"). The default stays 16 so figures
compare across runs; ``--max-tokens`` changes it.

The ``--json`` document: ``fifo`` and ``fair`` hold the equal-weight case
(``b_wait_p50_ms``, ``b_wait_p95_ms``, ``service_ms``, ``share_error``,
``throughput_per_s``, ``throughput_vs_fifo``, and B's wait with the burst
queued first, its time in the gateway and its latency at the client),
``goals`` the issue's targets met or not (``b_waits``: how many waits B's p95 is taken from;
``b_waits_passed``: how many of them saw another team's job start first, one the worker had taken
before B's was queued: ``passed_waits_ms`` in ``bench/_fairness_figures.py``; ``gave_way``: how many
jobs gave way at their start to a fairer one, ``workers/contract/repick.py``), ``scenarios`` every
scenario, phase and mode in full, ``requests`` the counts (sent, answered
200, ended ``completion`` in the audit, refused), ``settings`` and
``load`` (the load average around the run). Each phase's figures also
hold ``handover_ms`` (p50, p90: a busy slot's previous end to its job's
start). ``--schedule-json`` writes every phase run's schedule: per job its
team, request id, times from the phase's first queued job, wait and
hand-over. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/fairness.py [--burst 200] [--every-ms 100] [--repeat 8] [--max-tokens 16]
        [--scenarios equal,weights_3_1,three_teams] [--modes fifo,fair] [--quick] [--json FILE]
        [--schedule-json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/fairness.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._bare import CHAT_PATH  # noqa: E402
from bench._cpu import Role, RoleProbe  # noqa: E402
from bench._fairness_figures import Answer, Job, job_from_entry, timeline  # noqa: E402
from bench._fairness_report import MODES, PHASES, TRICKLE_PHASES, PhaseRun, report, table  # noqa: E402
from bench._fairness_stack import FairStack, Team, fair_mode_available, start_fair_stack  # noqa: E402
from bench._figures import write_json  # noqa: E402
from bench._load import Connection, Endpoint  # noqa: E402
from bench._stack import in_temp_dir, run_interruptible, say  # noqa: E402

#: Scenario name -> its teams; the first team bursts, the others trickle (latency) or burst later (shares).
SCENARIOS: dict[str, tuple[Team, ...]] = {
    "equal": (Team("eq-a", 1), Team("eq-b", 1)),
    "weights_3_1": (Team("w31-a", 3), Team("w31-b", 1)),
    "three_teams": (Team("tri-a", 2), Team("tri-b", 1), Team("tri-c", 1)),
}
#: Runs of every phase in each mode. A trickling team sends about six requests while a burst of 200
#: is served (two when it begins once the burst is queued), and a nearest-rank p95 of n waits is the
#: largest one while n < 20: three runs (the default until 2026-12-01) made "B's p95" the longest
#: of ~18 waits. Eight give ~48, whose p95 is the third longest.
DEFAULT_REPEAT = 8
#: The longest one request may take (a FIFO trickle request waits behind whole bursts).
REQUEST_TIMEOUT_S = 300.0
#: How often the shares phase asks the audit whether the first burst is all recorded.
ADMISSION_POLL_S = 0.02
#: The longest one phase may take; a stuck stack ends the run instead of hanging it.
PHASE_TIMEOUT_S = 900.0
_CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError)


# ---------------------------------------------------------------- the load


def request_body(max_tokens: int) -> dict[str, Any]:
    """``max_tokens`` tokens, greedy (the tiny model never ends early: every job costs the same)."""
    from workers.contract.registry import TINY_MODEL_NAME

    return {"model": TINY_MODEL_NAME, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}


async def _request(endpoint: Endpoint, opened: Connection | None = None) -> Answer:
    """One request on ``opened`` (or a new connection), closed after: what came back, and when."""
    connection = None
    sent = time.time()  # the wall clock: compared with the worker's and the audit's times
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            connection = opened or await Connection.open(endpoint)
            status, headers = await connection.send(endpoint.request)
            async for _ in connection.chunks(headers):
                pass
        return Answer(str(status), headers.get("x-govgate-request-id"), sent, time.time())
    except _CLIENT_ERRORS as exc:
        return Answer(type(exc).__name__, None, sent, time.time())
    finally:
        if connection is not None:
            connection.close()


async def _burst(endpoint: Endpoint, connections: list[Connection],
                 go: Awaitable[None] | None = None) -> list[Answer]:
    """Every connection sends its one request at once (after ``go``, when given)."""
    if go is not None:
        await go
    return list(await asyncio.gather(*(_request(endpoint, c) for c in connections)))


async def _admitted_then(admitted: Callable[[], int], count: int, pause_s: float, give_up: asyncio.Event) -> None:
    """Return ``pause_s`` after ``admitted()`` (a count the audit gives) reaches ``count``.

    Or once ``give_up`` is set (the burst was answered: a request that never
    reached the gateway is not recorded, and the phase must still end).
    """
    while not give_up.is_set() and await asyncio.to_thread(admitted) < count:
        await asyncio.sleep(ADMISSION_POLL_S)
    await asyncio.sleep(pause_s)


async def _trickle(endpoint: Endpoint, every_s: float, stop: asyncio.Event, for_s: float | None,
                   go: Awaitable[None] | None = None) -> list[Answer]:
    """One request every ``every_s`` (not waiting for answers) until ``stop`` is set, or for ``for_s``.

    It starts at once, or after ``go`` when given.
    """
    if go is not None:
        await go
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), []
    count = None if for_s is None else math.floor(for_s / every_s + 1e-9)
    number = 1
    while count is None or number <= count:
        pause = max(0.0, started + number * every_s - loop.time())
        if for_s is not None:
            await asyncio.sleep(pause)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=pause)
                break
        sent.append(asyncio.create_task(_request(endpoint)))
        number += 1
    return list(await asyncio.gather(*sent))


async def _drive(endpoints: dict[str, Endpoint], teams: tuple[Team, ...], phase: str, args: argparse.Namespace,
                 admitted: Callable[[], int]) -> dict[str, list[Answer]]:
    """The phase's load; every team's answers once all are in.

    ``admitted()`` counts the first team's requests the gateway has recorded
    (and so queued, or refused): in the shares phase the other teams send
    their bursts ``--stagger-ms`` after it reaches ``--burst``, so under FIFO
    they queue behind the whole first burst however fast the gateway admits;
    in the ``latency_queued`` phase the other teams start trickling then.
    """
    first, others = teams[0], teams[1:]
    bursting = [first, *others] if phase == "shares" else [first]
    opened = {t.name: [await Connection.open(endpoints[t.name]) for _ in range(args.burst)] for t in bursting}
    answered = asyncio.Event()
    tasks: dict[str, asyncio.Task] = {}
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        for team in bursting:
            go = None if team is first else _admitted_then(admitted, args.burst, args.stagger_ms / 1000, answered)
            tasks[team.name] = asyncio.create_task(_burst(endpoints[team.name], opened[team.name], go))
        if phase in TRICKLE_PHASES:
            for team in others:
                go = _admitted_then(admitted, args.burst, 0.0, answered) if phase == "latency_queued" else None
                tasks[team.name] = asyncio.create_task(
                    _trickle(endpoints[team.name], args.every_ms / 1000, answered, args.trickle_s, go))
        await tasks[first.name]
        answered.set()
        return {name: await task for name, task in tasks.items()}


# ---------------------------------------------------------------- phases and the run


def _jobs(store: Any, since_seq: int, request_ids: set[str]) -> tuple[list[Job], int]:
    """The phase's completed jobs from the audit trail, and how many of its requests ended as completion."""
    from audit import TERMINAL_KINDS

    jobs, completions = [], 0
    for entry in store.iter_entries(since_seq=since_seq):
        if entry.kind not in TERMINAL_KINDS or entry.request_id not in request_ids:
            continue
        if entry.kind == "completion":
            completions += 1
            job = job_from_entry(entry)
            if job is not None:
                jobs.append(job)
    return jobs, completions


def _recorded(store: Any, since_seq: int, team: str) -> int:
    """How many ``request`` entries of ``team`` the audit holds after ``since_seq``: requests admitted or refused."""
    from sqlalchemy import func, select

    from audit.tables import AuditEntryRow

    table = AuditEntryRow.__table__
    query = select(func.count()).select_from(table).where(
        table.c.seq > since_seq, table.c.team == team, table.c.kind == "request")
    with store.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def _gave_way(stack: FairStack) -> int:
    """How many of the tiny model's jobs have given way at their start so far (``workers/contract/repick.py``)."""
    import redis

    from workers.contract.fair_queues import tags_key
    from workers.contract.registry import TINY_MODEL_NAME
    from workers.contract.repick import GAVE_WAY_FIELD

    with redis.Redis.from_url(stack.redis_url) as client:
        return int(client.hget(tags_key(TINY_MODEL_NAME), GAVE_WAY_FIELD) or 0)


def run_phase(stack: FairStack, store: Any, scenario: str, phase: str, mode: str,
              args: argparse.Namespace) -> PhaseRun:
    """One phase against ``mode``'s gateway, with CPU probes around it and its jobs read back."""
    teams = SCENARIOS[scenario]
    endpoints = {t.name: Endpoint.post_json(stack.base_urls[mode], CHAT_PATH, request_body(args.max_tokens),
                                            {"Authorization": f"Bearer {stack.keys[t.name]}"}) for t in teams}
    probe = RoleProbe([Role("gateway", stack.gateway_pids[mode], "tree"), Role("worker_main", stack.worker_pid, "own"),
                       Role("worker_pool", stack.worker_pid, "children"), Role("redis", stack.redis_pid)])
    head = store.head()
    since = head.seq if head else 0
    gave_way = _gave_way(stack)
    probe.start()
    answers = asyncio.run(_drive(endpoints, teams, phase, args, lambda: _recorded(store, since, teams[0].name)))
    cpu = probe.stop()
    run = PhaseRun(scenario=scenario, phase=phase, mode=mode, teams=teams, cpu_s=cpu,
                   answers=answers, gave_way=_gave_way(stack) - gave_way)
    ids = {a.request_id for got in answers.values() for a in got if a.request_id}
    run.jobs, run.completions = _jobs(store, since, ids)
    return run


def _warm_up(stack: FairStack, args: argparse.Namespace) -> None:
    """A few requests per team and gateway: policy evaluators, caches and the admission's guess warm."""
    async def each() -> None:
        for mode in stack.base_urls:
            for scenario in args.scenarios:
                for team in SCENARIOS[scenario]:
                    endpoint = Endpoint.post_json(stack.base_urls[mode], CHAT_PATH, request_body(args.max_tokens),
                                                  {"Authorization": f"Bearer {stack.keys[team.name]}"})
                    for _ in range(args.warmup):
                        status = (await _request(endpoint)).status
                        if status != "200":
                            raise RuntimeError(f"warm-up request of team {team.name} to the {mode} gateway "
                                               f"answered {status}")

    asyncio.run(each())


def measure(args: argparse.Namespace, var_dir: Path) -> tuple[list[PhaseRun], dict[str, Any]]:
    """Start the stack, warm it, run every scenario's phases in both modes ``--repeat`` times."""
    from audit import AuditStore, make_engine

    _raise_open_files(args.burst * max(len(t) for t in SCENARIOS.values()) + 256)
    all_teams = [t for ts in SCENARIOS.values() for t in ts]
    runs: list[PhaseRun] = []
    load = {"before": os.getloadavg()}
    with contextlib.ExitStack() as stops:
        say(f"starting redis, one tiny-model worker (concurrency 1) and a gateway per mode "
            f"({', '.join(args.modes)}) …")
        stack = start_fair_stack(var_dir, all_teams, args.modes, stops,
                                 request_timeout_s=REQUEST_TIMEOUT_S,
                                 **worker_settings_of(args))
        engine = make_engine(stack.database_url)
        stops.callback(engine.dispose)
        store = AuditStore(engine)
        if args.warmup:
            _warm_up(stack, args)
        for number in range(1, args.repeat + 1):
            order = list(args.modes) if number % 2 else list(reversed(args.modes))
            for scenario in args.scenarios:
                for phase in PHASES:
                    for mode in order:
                        say(f"run {number}/{args.repeat}: {scenario}, {phase} phase, {mode} "
                            f"(load {os.getloadavg()[0]:.2f})")
                        runs.append(run_phase(stack, store, scenario, phase, mode, args))
    load["after"] = os.getloadavg()
    return runs, {k: [round(x, 2) for x in v] for k, v in load.items()}


def _raise_open_files(wanted: int) -> None:
    """Every burst request holds a connection open; lift the soft limit of open files as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                     hard))


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=200, help="requests a bursting team sends at once")
    parser.add_argument("--every-ms", type=float, default=100.0, help="a trickling team's interval")
    parser.add_argument("--trickle-s", type=float, help="trickle for this long (default: until the burst is answered)")
    parser.add_argument("--stagger-ms", type=float, default=0.0,
                        help="shares phase: how long after the first team's burst is all admitted the others send")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (see the docstring: why 16)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="runs of every phase in each mode")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests per team and gateway first")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated queue modes: fifo, fair")
    parser.add_argument("--quick", action="store_true", help="a short run: bursts of 60, one repeat")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--worker-pool", choices=("prefork", "solo"),
                        help="GOVGATE_WORKER_POOL of the worker (default: the setting's default)")
    parser.add_argument("--handover-on-take", choices=("on", "off"),
                        help="GOVGATE_HANDOVER_ON_TAKE of the worker (default: the setting's default)")
    parser.add_argument("--schedule-json", type=Path, metavar="FILE",
                        help="also write every phase's schedule (each job's times, wait and hand-over) to FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.burst, args.repeat = min(args.burst, 60), 1
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := [s for s in args.scenarios if s not in SCENARIOS] + [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown scenario or mode: {', '.join(unknown)}")
    if not args.scenarios or not args.modes:
        parser.error("--scenarios and --modes need at least one name each")
    if min(args.burst, args.repeat, args.max_tokens) < 1 or args.every_ms <= 0 or args.stagger_ms < 0 \
            or args.warmup < 0 or (args.trickle_s is not None and args.trickle_s <= 0):
        parser.error("--burst, --repeat and --max-tokens must be at least 1, --every-ms and --trickle-s above 0, "
                     "--stagger-ms and --warmup at least 0")
    return args


def worker_settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The worker settings the command line chose (only those given: the rest keep their defaults)."""
    chosen: dict[str, Any] = {}
    if getattr(args, "worker_pool", None):
        chosen["worker_pool"] = args.worker_pool
    if getattr(args, "handover_on_take", None):
        chosen["handover_on_take"] = args.handover_on_take == "on"
    return chosen


def worker_pool_of(args: argparse.Namespace) -> str:
    """The worker's pool: the one asked for, else the setting's default."""
    from gateway.settings import Settings

    return getattr(args, "worker_pool", None) or Settings().worker_pool


def handover_on_take_of(args: argparse.Namespace) -> bool:
    """Whether the worker carries a finished output's hand-over on its take: as asked, else the default."""
    from gateway.settings import Settings

    chosen = worker_settings_of(args)
    return chosen["handover_on_take"] if "handover_on_take" in chosen else Settings().handover_on_take


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"burst": args.burst, "every_ms": args.every_ms, "trickle_s": args.trickle_s,
            "stagger_ms": args.stagger_ms, "max_tokens": args.max_tokens, "repeat": args.repeat,
            "scenarios": args.scenarios, "modes": args.modes, "worker_concurrency": 1,
            "worker_pool": worker_pool_of(args),
            "handover_on_take": handover_on_take_of(args),
            "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(args: argparse.Namespace, write: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Measure, print the table, write the JSON; the document, or None when a part failed."""
    from govgate.redis_server import RedisUnavailable
    from govgate.stack import StartupError

    if "fair" in args.modes and not fair_mode_available():
        say("bench/fairness.py: this checkout has no GOVGATE_QUEUE_MODE (the fair queue core); "
            "run with --modes fifo, or on a checkout that has it")
        return None
    measured = in_temp_dir(lambda var_dir: measure(args, var_dir),
                           (StartupError, RedisUnavailable, TimeoutError, OSError, RuntimeError))
    if measured is None:
        return None
    runs, load = measured
    document = report(runs, settings_of(args), load)
    carried = "on" if handover_on_take_of(args) else "off"
    write(f"one worker (concurrency 1, {worker_pool_of(args)} pool, hand-over on take {carried}), "
          f"tiny model, max_tokens {args.max_tokens}; "
          f"bursts of {args.burst}, "
          f"trickle every {args.every_ms:g} ms; {args.repeat} run(s) per phase and mode, alternating; "
          f"{os.cpu_count()} CPUs, load average {load['before'][0]} before, {load['after'][0]} after")
    write(table(document))
    if args.json:
        write_json(args.json, document)
    if getattr(args, "schedule_json", None):
        write_json(args.schedule_json, schedules(runs))
    return document


def schedules(runs: list[PhaseRun]) -> list[dict[str, Any]]:
    """Each phase run's schedule (:func:`bench._fairness_figures.timeline`), numbered by repeat."""
    seen: dict[tuple[str, str, str], int] = {}
    out = []
    for r in runs:
        key = (r.scenario, r.phase, r.mode)
        seen[key] = seen.get(key, 0) + 1
        out.append({"scenario": r.scenario, "phase": r.phase, "mode": r.mode, "repeat": seen[key],
                    "jobs": timeline(r.jobs)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_interruptible(lambda: 0 if run(args) is not None else 1, "bench/fairness.py")


if __name__ == "__main__":
    sys.exit(main())
