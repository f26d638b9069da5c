"""How much does governance cost per request? (``make bench``)

Starts a private govgate stack (Redis, one worker for the tiny model, the API
under uvicorn) in a temporary folder, plus a bare Litestar app served by the
same uvicorn settings, drives both with the same async client loop, and
prints throughput, latency and server CPU per request for each, with the
ratios govgate / baseline. Requests ask for one token at temperature 0, so
what is measured is the gateway's path (auth, policy, audit, queue, result
hand-back), not generation.

The absolute figures move with whatever else the machine is doing; the
ratios are the figures to watch, because both sides run back to back under
the same noise. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/overhead.py [--requests 1000] [--concurrency 32] [--warmup 64]

Everything started here listens on loopback or a unix socket and is stopped
at the end, also on Ctrl-C, SIGTERM or an error; if this process is killed
outright, its children receive SIGTERM (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as `python bench/overhead.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import percentile, ratio, rounded, table_row  # noqa: E402
from bench._stack import (  # noqa: E402
    HEALTH_PATH,
    HOST,
    LOG_LEVEL,
    Running,
    free_port,
    in_temp_dir,
    run_interruptible,
    say,
    spawn,
    start_govgate,
)

CHAT_PATH = "/v1/chat/completions"
#: The longest a single request may take before it counts as an error.
REQUEST_TIMEOUT_S = 30.0
#: The longest one measured phase may take; a stuck stack ends the run, not hangs it.
PHASE_TIMEOUT_S = 300.0


# ---------------------------------------------------------------- baseline app


def baseline_app() -> Any:
    """A Litestar app doing what any JSON endpoint does and nothing else.

    It parses the same body and answers with a chat-completion-shaped document
    of similar size, so the difference to govgate is the governance path, not
    the framework or JSON handling.
    """
    import uuid

    from litestar import Litestar, get, post

    @post(CHAT_PATH, status_code=200)
    async def chat(data: dict[str, Any]) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(data.get("model", "")),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "finish_reason": "length",
                "logprobs": None,
            }],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        }

    @get(HEALTH_PATH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar(route_handlers=[chat, health], debug=False)


def serve_baseline(port: int) -> None:
    """Run the baseline with the uvicorn options ``govgate serve`` uses."""
    import uvicorn

    uvicorn.run(baseline_app(), host=HOST, port=port, log_level=LOG_LEVEL.lower(),
                access_log=False, lifespan="on")


# ---------------------------------------------------------------- CPU accounting


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def _child_map() -> dict[int, list[int]]:
    """ppid -> pids for every process visible now (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (a Celery worker forks its pool)."""
    children = _child_map()
    found, todo = [], [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process tree, including children it already reaped.

    Each live process contributes utime+stime plus cutime+cstime (its reaped
    children), so a pool process replaced mid-run is still counted once.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in _tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return total / ticks


@dataclass
class CpuProbe:
    """Named process trees whose CPU is read before and after a phase."""

    pids: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.before = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}

    def ms_per_request(self, requests: int) -> dict[str, float]:
        """CPU milliseconds each tree spent per request since :meth:`start`."""
        return {name: (tree_cpu_seconds(pid) - self.before[name]) * 1000 / max(requests, 1)
                for name, pid in self.pids.items()}


# ---------------------------------------------------------------- client loop


@dataclass
class Phase:
    """The outcome of one measured run against one server."""

    requests: int
    wall_s: float
    latencies_ms: list[float]
    statuses: Counter
    #: CPU this process spent driving the phase: when it nears wall time, the client is the bottleneck.
    client_cpu_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of successful requests' latency."""
        return percentile(self.latencies_ms, p)


async def drive(base_url: str, headers: dict[str, str], body: dict[str, Any],
                count: int, concurrency: int) -> Phase:
    """Send ``count`` requests with ``concurrency`` in flight; one client, kept-alive connections."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    numbers = iter(range(count))  # shared: each loop takes the next request number
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        async def loop() -> None:
            for _ in numbers:
                started = time.perf_counter()
                try:
                    response = await client.post(CHAT_PATH, json=body)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == "200":
                    latencies.append((time.perf_counter() - started) * 1000)
                statuses[status] += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            async with asyncio.timeout(PHASE_TIMEOUT_S):
                await asyncio.gather(*(loop() for _ in range(concurrency)))
        except TimeoutError:
            raise TimeoutError(f"{count} requests to {base_url} did not finish within {PHASE_TIMEOUT_S:.0f}s") from None
        wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Phase(requests=count, wall_s=wall, latencies_ms=latencies, statuses=statuses, client_cpu_s=client_cpu)


def measure(base_url: str, headers: dict[str, str], body: dict[str, Any], args: argparse.Namespace,
            probe: CpuProbe) -> tuple[Phase, dict[str, float]]:
    """Warm up (unmeasured), then one measured phase with CPU read around it."""
    asyncio.run(drive(base_url, headers, body, args.warmup, args.concurrency))
    probe.start()
    phase = asyncio.run(drive(base_url, headers, body, args.requests, args.concurrency))
    cpu = probe.ms_per_request(phase.requests)
    cpu["client"] = phase.client_cpu_s * 1000 / phase.requests
    return phase, cpu


# ---------------------------------------------------------------- the stacks


@dataclass
class Started:
    """What one start step gives the measurement: where to send, what to watch."""

    base_url: str
    headers: dict[str, str]
    cpu_pids: dict[str, int]
    stop: Callable[[], None]


def start_gateway_side(var_dir: Path) -> Started:
    """Redis, one tiny-model worker, ``govgate serve``, and an admin key."""
    from workers.contract.registry import TINY_MODEL_NAME

    running = start_govgate(var_dir, [TINY_MODEL_NAME], note="bench/overhead.py", request_timeout_s=REQUEST_TIMEOUT_S)
    stack = running.stack
    return Started(base_url=running.base_url, headers=running.headers,
                   cpu_pids={"server": stack.api.pid, "worker": stack.workers[TINY_MODEL_NAME].pid,
                             "redis": stack.redis.process.pid},
                   stop=running.stop)


def start_baseline(var_dir: Path) -> Started:
    """The bare Litestar app in its own uvicorn process (this file, ``--serve-baseline``)."""
    from govgate.stack import Stack, wait_for_api

    port = free_port(HOST)
    running = Running(base_url=f"http://{HOST}:{port}", headers={}, stack=Stack(
        api=spawn([str(Path(__file__).resolve()), "--serve-baseline", str(port)], dict(os.environ),
                  var_dir / "baseline.log")))
    try:
        wait_for_api(running.base_url + HEALTH_PATH, running.stack)
    except BaseException:
        running.stop()
        raise
    return Started(base_url=running.base_url, headers={}, cpu_pids={"server": running.stack.api.pid},
                   stop=running.stop)


def request_body() -> dict[str, Any]:
    """One token, greedy: the cheapest request the worker can answer."""
    from workers.contract.registry import TINY_MODEL_NAME

    return {"model": TINY_MODEL_NAME, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello in one word."}]}


def run_one(start: Callable[[Path], Started], var_dir: Path, args: argparse.Namespace,
            say: Callable[[str], None], name: str) -> tuple[Phase, dict[str, float]]:
    """Start one server, measure it, stop it, so the other side runs on a quiet machine."""
    say(f"{name}: starting …")
    started = start(var_dir)
    try:
        say(f"{name}: {args.warmup} warm-up + {args.requests} measured requests at concurrency {args.concurrency}")
        return measure(started.base_url, started.headers, request_body(), args, CpuProbe(started.cpu_pids))
    finally:
        started.stop()


# ---------------------------------------------------------------- reporting


def figures(phase: Phase, cpu: dict[str, float]) -> dict[str, Any]:
    """One side's figures, rounded for reading; the JSON line carries the same."""
    p50, p99 = phase.percentile(50), phase.percentile(99)
    return {
        "requests": phase.requests,
        "wall_s": round(phase.wall_s, 3),
        "rps": round(phase.rps, 1),
        "p50_ms": rounded(p50, 2),
        "p99_ms": rounded(p99, 2),
        "errors": phase.errors,
        "statuses": dict(phase.statuses),
        "cpu_ms_per_request": {k: round(v, 3) for k, v in cpu.items()},
    }


def ratios(gov: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """govgate / baseline; throughput below 1 and latency/CPU above 1 mean overhead."""
    gov_cpu, base_cpu = gov["cpu_ms_per_request"], base["cpu_ms_per_request"]
    return {
        "rps": ratio(gov["rps"], base["rps"]),
        "p50": ratio(gov["p50_ms"], base["p50_ms"]),
        "p99": ratio(gov["p99_ms"], base["p99_ms"]),
        "server_cpu": ratio(gov_cpu["server"], base_cpu["server"]),
        "total_cpu": ratio(sum(gov_cpu[k] for k in ("server", "worker", "redis")), base_cpu["server"]),
    }


_LABEL_WIDTH, _CELL_WIDTH = 16, 9
_COLUMNS = ("req/s", "p50 ms", "p99 ms", "errors", "server", "worker", "redis", "client")


def _row(label: str, cells: list[Any], suffix: str = "") -> str:
    return table_row(label, cells, (_LABEL_WIDTH, _CELL_WIDTH), suffix)


def table(gov: dict[str, Any], base: dict[str, Any], ratio_of: dict[str, Any]) -> str:
    """A small aligned table: one row per side, one for the ratios."""
    cpu_title = "--- CPU ms per request ---".center(4 * _CELL_WIDTH)
    lines = [(" " * (_LABEL_WIDTH + 4 * _CELL_WIDTH) + cpu_title).rstrip(), _row("", list(_COLUMNS))]
    for name, side in (("govgate", gov), ("bare litestar", base)):
        cpu = side["cpu_ms_per_request"]
        lines.append(_row(name, [side["rps"], side["p50_ms"], side["p99_ms"], side["errors"],
                                 *(cpu.get(k) for k in ("server", "worker", "redis", "client"))]))
    lines.append(_row("govgate / bare", [ratio_of["rps"], ratio_of["p50"], ratio_of["p99"], None,
                                         ratio_of["server_cpu"], None, None, None], suffix="x"))
    lines.append(f"all govgate server-side processes (server+worker+redis) / bare server CPU: {ratio_of['total_cpu']}x")
    return "\n".join(lines)


def _status_note(name: str, side: dict[str, Any]) -> str | None:
    if not side["errors"]:
        return None
    return f"{name}: non-200 outcomes {json.dumps(side['statuses'], sort_keys=True)}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 1000 by default: CPU is read in 10 ms ticks, and the bare server spends well under 1 ms a request.
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per side (default 1000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--warmup", type=int, default=64, help="unmeasured requests first (default 64)")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be at least 1, --warmup at least 0")
    return args


def run(args: argparse.Namespace) -> int:
    """Measure govgate, then the baseline, and print the table and the JSON line."""
    from govgate.redis_server import RedisUnavailable
    from govgate.stack import StartupError

    def both(var_dir: Path) -> tuple[tuple[Phase, dict[str, float]], ...]:
        return (run_one(start_gateway_side, var_dir, args, say, "govgate"),
                run_one(start_baseline, var_dir, args, say, "bare litestar"))

    measured = in_temp_dir(both, (StartupError, RedisUnavailable, TimeoutError, OSError))
    if measured is None:
        return 1
    (gov_phase, gov_cpu), (base_phase, base_cpu) = measured
    gov, base = figures(gov_phase, gov_cpu), figures(base_phase, base_cpu)
    side_ratios = ratios(gov, base)
    print(f"concurrency {args.concurrency}, {args.requests} requests per side, max_tokens 1, "
          f"{os.cpu_count()} CPUs")
    print(table(gov, base, side_ratios))
    for note in filter(None, (_status_note("govgate", gov), _status_note("bare litestar", base))):
        print(note)
    print(json.dumps({"concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup,
                      "govgate": gov, "baseline": base, "ratios": side_ratios}, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return 0
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
