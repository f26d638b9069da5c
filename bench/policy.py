"""What do a policy decision and the usage counters cost per request?

Two questions, each answered against its own baseline in the same run:

1. **Policy decisions.** The full shipped policy set (``policies/``) is
   evaluated by the embedded engine (regorus in a child process) and by a real
   OPA server that loaded the folder itself (``opa run --server policies/``,
   as in production). Both get the same mix of realistic inputs, built with
   :func:`gateway.policy_input.build_input`: allowed requests, denials by
   role, prompts with PII that content rules redact or deny, a blocked
   pattern, a restricted model with a declared purpose, and usage counters
   just below and at their limits. Each engine runs N decisions one after
   the other, then N with C coroutines in flight; the figure to watch is the
   ratio OPA / embedded, because both sides run back to back under the same
   noise. The OPA figure includes the HTTP client, as the gateway pays it.

2. **Usage counters.** Against a private Redis on a unix socket, each
   request does what the gateway does on the counters: ``snapshot`` (before
   the policy), ``reserve`` (after an allow) and ``settle`` (after the
   model answered), three scripted round trips. A plain ``PING`` round trip
   in the same run is the baseline.

The limits given to ``reserve`` are finite (every check runs) but never
bind: the bench measures the common path, an admitted request, and a refusal
would skip the writes and make the figure look cheaper than it is.

Nothing here asserts a timing. Before measuring, every input is run once
through each engine and the outcome compared with what the input is meant to
show (and the two engines with each other); a mismatch is printed as a note,
so a policy change that turns the mix into something else does not go
unnoticed.

Usage::

    .venv/bin/python bench/policy.py [--decisions 2000] [--concurrency 32] [--requests N] [--warmup 100]

Everything started here listens on loopback or a unix socket and is stopped
at the end, also on Ctrl-C, SIGTERM or an error; if this process is killed
outright, Redis and OPA receive SIGTERM (``PR_SET_PDEATHSIG``) and the
embedded evaluator exits when its pipe closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

if not __package__:  # run as `python bench/policy.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import percentile, ratio, rounded, table_row  # noqa: E402
from bench._stack import (  # noqa: E402
    ROOT,
    TempDir,
    forget_govgate_environment,
    run_interruptible,
    say,
    stop_later,
)
from gateway.policy.opa_binary import LOCAL_OPA, find_opa  # noqa: E402

POLICY_DIR = ROOT / "policies"
#: Per-decision timeout of both engines: generous, so a slow machine shows as latency, not as denials.
DECISION_TIMEOUT_S = 5.0
#: The longest one measured phase may take; a stuck engine or Redis ends the run, not hangs it.
PHASE_TIMEOUT_S = 300.0
#: Building OPA from source can take minutes on a cold Go cache.
MAKE_OPA_TIMEOUT_S = 1200.0
#: A policy folder being edited may be momentarily broken or change between loads: retry this often.
LOAD_ATTEMPTS = 3
LOAD_RETRY_DELAY_S = 2.0
#: A fixed time (Tuesday 2023-11-14 12:00 UTC, inside the restricted model's hours) so schedule
#: rules decide the same way on every run.
FIXED_NOW_NS = 1_699_963_200 * 1_000_000_000

#: Tokens a counters request reserves and then really uses.
RESERVED_TOKENS = 256
ACTUAL_TOKENS = 97
#: Requests are spread over this many principals, in this many teams, as a busy gateway's would be.
PRINCIPALS = 16
TEAMS = 4
#: Finite (so every limit check runs) but far above what the bench can use.
NON_BINDING = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "tokens_per_day": 10**12,
               "tokens_per_month": 10**13, "in_flight": 10**6}


# ---------------------------------------------------------------- the input mix


@dataclass(frozen=True)
class Sample:
    """One policy input and what the shipped policy is meant to answer to it.

    ``expect_code`` is one reason code the deny must carry (None for an allow).
    """

    name: str
    input: dict[str, Any]
    expect_allow: bool
    expect_code: str | None = None


def _usage(requests: int = 3, tokens_minute: int = 900, today: int = 12_000, month: int = 150_000,
           in_flight: int = 1) -> dict[str, Any]:
    """A usage snapshot shaped as ``UsageCounters.snapshot`` returns it (the team's counters are 4x)."""
    def view(scale: int) -> dict[str, int]:
        return {"requests_last_minute": requests * scale, "tokens_last_minute": tokens_minute * scale,
                "tokens_today": today * scale, "tokens_this_month": month * scale,
                "in_flight": in_flight * scale, "minute_window_frees_in_s": 17}
    return {"principal": view(1), "team": view(4)}


_LONG_CHAT = [
    {"role": "system", "content": "You are a careful assistant for the support team. Answer briefly and "
                                  "never repeat personal data back to the customer."},
    {"role": "user", "content": "Here is the ticket history. " + " ".join(
        f"Entry {i}: the customer reported that the export job failed at step {i % 7} with a timeout "
        f"after {30 + i} seconds; retrying did not help and the log shows a lock wait." for i in range(24))},
    {"role": "assistant", "content": "Understood. Which part should I summarise?"},
    {"role": "user", "content": "Summarise the root cause and draft a reply to ops-desk@example.org."},
]


def sample_inputs() -> list[Sample]:
    """The mix every engine and every mode evaluates, in this order, round robin."""
    from gateway.auth import Principal
    from gateway.policy_input import build_input
    from workers.contract.registry import ModelSpec

    def model(name: str, tags: tuple[str, ...] = ()) -> ModelSpec:
        return ModelSpec(name=name, path=Path("/nonexistent"), context_length=4096, tags=tags)

    def build(roles: tuple[str, ...], model_spec: ModelSpec, *, text: str | None = None,
              messages: list[dict[str, str]] | None = None, team: str = "support", purpose: str | None = None,
              usage: dict[str, Any] | None = None, max_tokens: int = 200) -> dict[str, Any]:
        if messages is None:
            messages = [{"role": "user", "content": text or ""}]
        principal = Principal(id="u-bench", team=team, roles=roles, key_id="k-bench")
        return build_input(principal=principal, endpoint="chat.completions", model=model_spec,
                           max_tokens=max_tokens, stream=False, purpose=purpose, messages=messages,
                           usage=usage if usage is not None else _usage(), now_ns=FIXED_NOW_NS)

    tiny, big = model("govgate-tiny"), model("big")
    restricted = model("govgate-restricted", tags=("restricted",))
    return [
        Sample("allowed: analyst, plain prompt",
               build(("analyst",), tiny, text="Summarise these incident notes in three bullet points."), True),
        Sample("allowed: long chat with an email (redacted)",
               build(("analyst",), tiny, messages=_LONG_CHAT), True),
        Sample("allowed: admin, email+phone+IBAN (redacted)",
               build(("admin",), big, team="research", text="Write to jane.doe@example.com or call "
                     "+44 20 7946 0958; refund to IBAN GB82 WEST 1234 5698 7654 32 today.", max_tokens=1000),
               True),
        Sample("denied by role: viewer",
               build(("viewer",), tiny, text="hello"), False, "model_not_allowed"),
        Sample("denied by role: analyst asks for big",
               build(("analyst",), big, text="hello"), False, "model_not_allowed"),
        Sample("denied by content: card number",
               build(("analyst",), tiny, text="Charge card 4111 1111 1111 1111 exp 12/29 for the order."),
               False, "pii_detected"),
        Sample("denied by content: US SSN",
               build(("analyst",), tiny, text="The applicant's SSN is 123-45-6789, please verify it."),
               False, "pii_detected"),
        Sample("denied by content: private key",
               build(("admin",), big, text="Why does this fail?\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow"),
               False, "blocked_content"),
        Sample("allowed: restricted model with purpose",
               build(("admin",), restricted, team="research", text="Evaluate this answer.", purpose="evaluation"),
               True),
        Sample("denied: restricted model, no purpose",
               build(("admin",), restricted, team="research", text="Evaluate this answer."),
               False, "purpose_required"),
        Sample("allowed: limits nearly exhausted",
               build(("analyst",), tiny, text="One more question.", max_tokens=100,
                     usage=_usage(requests=119, tokens_minute=19_800, today=199_900)), True),
        Sample("denied: requests per minute used up",
               build(("analyst",), tiny, text="One more question.", usage=_usage(requests=120)),
               False, "rate_limited"),
        Sample("denied: daily tokens used up",
               build(("analyst",), tiny, text="One more question.", usage=_usage(today=199_950)),
               False, "budget_exceeded"),
    ]


def mix_notes(name: str, samples: list[Sample], decisions: list[Any]) -> list[str]:
    """Where the engine's answers differ from what the inputs are meant to show."""
    notes = []
    for sample, decision in zip(samples, decisions):
        codes = sorted({reason.code for reason in decision.reasons})
        if decision.allow != sample.expect_allow or (sample.expect_code and sample.expect_code not in codes):
            wanted = "allow" if sample.expect_allow else f"deny {sample.expect_code}"
            got = "allow" if decision.allow else f"deny {','.join(codes)}"
            notes.append(f"{name}: input '{sample.name}' meant to show {wanted}, got {got}")
    return notes


# ---------------------------------------------------------------- timing


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


# ---------------------------------------------------------------- OPA


def ensure_opa(say: Callable[[str], None]) -> tuple[Path | None, str]:
    """The opa binary, building it with ``make opa`` when missing; else None and why."""
    binary = find_opa()
    if binary is not None:
        return binary, ""
    say(f"opa: not found ({LOCAL_OPA} or on PATH); running `make opa` …")
    try:
        result = subprocess.run(["make", "opa"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                                stderr=sys.stderr, timeout=MAKE_OPA_TIMEOUT_S, check=False)
        failed = f"`make opa` exited with {result.returncode}" if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        failed = f"`make opa` failed: {exc}"
    binary = find_opa()
    if binary is None:
        return None, f"OPA part skipped: no opa binary and {failed or '`make opa` built none'}"
    return binary, ""


# ---------------------------------------------------------------- policy engines


def decide_operation(engine: Any, samples: list[Sample]) -> Operation:
    """One decision on the next input of the mix; a fail-closed deny counts as a failure."""
    from gateway.policy import POLICY_ERROR, POLICY_UNAVAILABLE

    broken = {POLICY_ERROR, POLICY_UNAVAILABLE}

    async def operation(number: int) -> str | None:
        decision = await engine.decide(samples[number % len(samples)].input)
        if not decision.allow:
            for reason in decision.reasons:
                if reason.code in broken:
                    return reason.code
        return None

    return operation


async def load_engines(opa_url: str | None) -> tuple[Any, Any | None]:
    """Both engines on the same revision of ``policies/``, retried while the folder is being edited.

    OPA read the folder when it started; if the folder changed since, the
    OPA engine refuses to connect (revision mismatch) and the next attempt
    finds the same answer, which is then reported as an error.
    """
    from gateway.policy import EmbeddedPolicyEngine, OpaPolicyEngine, PolicyLoadError

    for attempt in range(1, LOAD_ATTEMPTS + 1):
        embedded = opa = None
        try:
            embedded = EmbeddedPolicyEngine.load(POLICY_DIR, DECISION_TIMEOUT_S)
            if opa_url is not None:
                opa = await OpaPolicyEngine.connect(opa_url, POLICY_DIR, DECISION_TIMEOUT_S, load=False)
                if opa.revision != embedded.revision:
                    raise PolicyLoadError(f"revisions differ: OPA {opa.revision}, embedded {embedded.revision}")
            return embedded, opa
        except PolicyLoadError as exc:
            for engine in (embedded, opa):
                if engine is not None:
                    await engine.aclose()
            if attempt == LOAD_ATTEMPTS:
                raise
            print(f"policy: {exc}; retrying in {LOAD_RETRY_DELAY_S:g}s", file=sys.stderr, flush=True)
            await asyncio.sleep(LOAD_RETRY_DELAY_S)
    raise AssertionError("unreachable")


async def check_mix(engines: dict[str, Any], samples: list[Sample]) -> list[str]:
    """Run each input once per engine: the mix is what it claims, and the engines agree."""
    answers = {name: [await engine.decide(s.input) for s in samples] for name, engine in engines.items()}
    notes = [note for name, decisions in answers.items() for note in mix_notes(name, samples, decisions)]
    if len(answers) == 2:
        first, second = answers.values()
        for sample, a, b in zip(samples, first, second):
            if a.to_document() != b.to_document():
                notes.append(f"engines disagree on '{sample.name}': "
                             f"{json.dumps(a.to_document())} vs {json.dumps(b.to_document())}")
    return notes


async def bench_policy(opa_url: str | None, samples: list[Sample], args: argparse.Namespace,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """Both engines, sequential then concurrent, back to back in one run."""
    embedded, opa = await load_engines(opa_url)
    try:
        engines = {"embedded": embedded} if opa is None else {"embedded": embedded, "opa": opa}
        notes = await check_mix(engines, samples)
        runs = {}
        for name, engine in engines.items():
            say(f"policy: {name}: {args.warmup} warm-up + {args.decisions} sequential + "
                f"{args.decisions} at concurrency {args.concurrency}")
            runs[name] = await sequential_and_concurrent(decide_operation(engine, samples), args, args.decisions)
        return {"revision": embedded.revision, "runs": runs, "notes": notes}
    finally:
        for engine in (opa, embedded):
            if engine is not None:
                await engine.aclose()


# ---------------------------------------------------------------- usage counters


def counters_operation(counters: Any, tag: str, per_op: dict[str, list[float]]) -> Operation:
    """snapshot + reserve + settle for one request, as the gateway does; each step's time kept too."""
    from gateway.limits.counters import Refusal

    limits = {"principal": dict(NON_BINDING), "team": dict(NON_BINDING)}

    async def step(name: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter_ns()
        result = await call
        per_op[name].append((time.perf_counter_ns() - started) / 1000)
        return result

    async def operation(number: int) -> str | None:
        principal, team = f"user-{number % PRINCIPALS}", f"team-{number % TEAMS}"
        await step("snapshot", counters.snapshot(principal, team))
        outcome = await step("reserve", counters.reserve(f"bench-{tag}-{number}", principal, team, limits,
                                                         RESERVED_TOKENS))
        if isinstance(outcome, Refusal):
            return outcome.code
        await step("settle", counters.settle(outcome, ACTUAL_TOKENS))
        return None

    return operation


def ping_operation(client: Any) -> Operation:
    async def operation(_number: int) -> str | None:
        await client.ping()
        return None

    return operation


def _step_figures(per_op: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    return {name: {"p50_us": rounded(percentile(values, 50)), "p99_us": rounded(percentile(values, 99))}
            for name, values in per_op.items()}


async def bench_counters(redis_url: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """PING and the counters, sequential then concurrent, over one connection pool."""
    import redis.asyncio as aioredis

    from gateway.limits.counters import UsageCounters

    client = aioredis.Redis.from_url(redis_url, socket_timeout=DECISION_TIMEOUT_S,
                                     socket_connect_timeout=DECISION_TIMEOUT_S)
    counters = UsageCounters(client, prefix="bench:usage")
    try:
        say(f"counters: {args.warmup} warm-up + {args.requests} sequential + {args.requests} "
            f"at concurrency {args.concurrency}, PING first")
        ping = await sequential_and_concurrent(ping_operation(client), args, args.requests)
        steps: dict[str, dict[str, list[float]]] = {}
        runs: dict[str, Run] = {}
        await timed(counters_operation(counters, "warm", _new_steps()), args.warmup,
                    min(args.concurrency, max(args.warmup, 1)))
        for mode, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
            steps[mode] = _new_steps()
            runs[mode] = await timed(counters_operation(counters, mode, steps[mode]), args.requests, concurrency)
        return {"ping": ping, "counters": runs, "steps": {m: _step_figures(s) for m, s in steps.items()}}
    finally:
        await counters.aclose()
        await client.aclose()


def _new_steps() -> dict[str, list[float]]:
    return {"snapshot": [], "reserve": [], "settle": []}


# ---------------------------------------------------------------- reporting


def ratios(top: Run, bottom: Run) -> dict[str, float | None]:
    """top / bottom; latency above 1 and throughput below 1 mean ``top`` costs more."""
    return {"p50": ratio(top.percentile(50), bottom.percentile(50)),
            "p99": ratio(top.percentile(99), bottom.percentile(99)),
            "per_s": ratio(top.per_s, bottom.per_s)}


_LABEL_WIDTH, _CELL_WIDTH = 40, 11
_COLUMNS = ("p50 µs", "p99 µs", "per s", "failures")


def _row(label: str, cells: list[Any], suffix: str = "") -> str:
    return table_row(label, cells, (_LABEL_WIDTH, _CELL_WIDTH), suffix)


def _run_row(label: str, run: Run) -> str:
    return _row(label, [rounded(run.percentile(50)), rounded(run.percentile(99)), round(run.per_s),
                        sum(run.failures.values())])


def _ratio_row(label: str, by: dict[str, float | None]) -> str:
    return _row(label, [by["p50"], by["p99"], by["per_s"]], suffix="x")


def policy_table(policy: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Rows per engine and mode, then OPA / embedded."""
    lines = [_row("policy decisions", list(_COLUMNS))]
    runs = policy["runs"]
    for name, by_mode in runs.items():
        for mode, run in by_mode.items():
            lines.append(_run_row(f"  {name} {_mode_label(mode, args)}", run))
    if "opa" in runs:
        for mode in ("sequential", "concurrent"):
            lines.append(_ratio_row(f"  opa / embedded {_mode_label(mode, args)}",
                                    ratios(runs["opa"][mode], runs["embedded"][mode])))
        lines.append("  (latency above 1x and per s below 1x: OPA costs more; failures are fail-closed denies)")
    return lines


def counters_table(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """PING and counters rows per mode, the steps of a request, then counters / PING."""
    lines = [_row("usage counters (per request)", list(_COLUMNS))]
    for mode in ("sequential", "concurrent"):
        lines.append(_run_row(f"  PING {_mode_label(mode, args)}", result["ping"][mode]))
        lines.append(_run_row(f"  snapshot+reserve+settle {_mode_label(mode, args)}", result["counters"][mode]))
        for step, figures in result["steps"][mode].items():
            lines.append(_row(f"    {step}", [figures["p50_us"], figures["p99_us"]]))
    for mode in ("sequential", "concurrent"):
        lines.append(_ratio_row(f"  counters / PING {_mode_label(mode, args)}",
                                ratios(result["counters"][mode], result["ping"][mode])))
    lines.append("  (a counters request is three scripted round trips; PING is one bare round trip)")
    return lines


def _mode_label(mode: str, args: argparse.Namespace) -> str:
    return "seq" if mode == "sequential" else f"c={args.concurrency}"


def _figures(by_mode: dict[str, Run]) -> dict[str, Any]:
    return {mode: run.figures() for mode, run in by_mode.items()}


def summary(policy: dict[str, Any], opa_skipped: str, counters: dict[str, Any], samples: list[Sample],
            args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the run, for the JSON line."""
    runs = policy["runs"]
    policy_doc: dict[str, Any] = {
        "revision": policy["revision"],
        "inputs": [s.name for s in samples],
        "embedded": _figures(runs["embedded"]),
        "opa": _figures(runs["opa"]) if "opa" in runs else None,
        "opa_skipped": opa_skipped or None,
        "opa_over_embedded": None if "opa" not in runs else {
            mode: ratios(runs["opa"][mode], runs["embedded"][mode]) for mode in ("sequential", "concurrent")},
        "notes": policy["notes"],
    }
    counters_doc = {
        "ping": _figures(counters["ping"]),
        "snapshot_reserve_settle": _figures(counters["counters"]),
        "steps": counters["steps"],
        "counters_over_ping": {mode: ratios(counters["counters"][mode], counters["ping"][mode])
                               for mode in ("sequential", "concurrent")},
    }
    return {"decisions": args.decisions, "requests": args.requests, "concurrency": args.concurrency,
            "warmup": args.warmup, "cpus": os.cpu_count(), "policy": policy_doc, "counters": counters_doc}


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=2000, help="decisions per engine and mode (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="coroutines in flight (default 32)")
    parser.add_argument("--requests", type=int, default=None,
                        help="counters requests and PINGs per mode (default: as --decisions)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured operations before each (default 100)")
    parser.add_argument("--no-opa", action="store_true", help="measure the embedded engine only")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = args.decisions
    if args.decisions < 1 or args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--decisions, --requests and --concurrency must be at least 1, --warmup at least 0")
    return args


async def measure(opa_url: str | None, redis_url: str, samples: list[Sample], args: argparse.Namespace,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Policy first, then counters: one event loop, nothing else running."""
    policy = await bench_policy(opa_url, samples, args, say)
    counters = await bench_counters(redis_url, args, say)
    return policy, counters


def run(args: argparse.Namespace) -> int:
    """Start Redis and OPA, measure, stop them, print the table and the JSON line."""
    from gateway.policy import PolicyLoadError
    from govgate.opa_server import OpaServer
    from govgate.redis_server import RedisProcess, RedisUnavailable

    forget_govgate_environment()
    samples = sample_inputs()
    opa_skipped = "OPA part skipped: --no-opa" if args.no_opa else ""
    with contextlib.ExitStack() as stack:
        work_dir = stack.enter_context(TempDir())
        try:
            opa_url = None
            if not args.no_opa:
                binary, opa_skipped = ensure_opa(say)
                if binary is not None:
                    say(f"opa: starting {binary} on the policy folder …")
                    opa = OpaServer(binary, work_dir, POLICY_DIR).start()
                    stop_later(stack, opa.stop)
                    opa_url = opa.url
            if opa_skipped:
                say(opa_skipped)
            say("redis: starting …")
            redis = RedisProcess.start(work_dir / "redis", persist=False)
            stop_later(stack, redis.stop)
            policy, counters = asyncio.run(measure(opa_url, redis.url, samples, args, say))
        except (PolicyLoadError, RedisUnavailable, RuntimeError, TimeoutError, OSError) as exc:
            say(f"bench: {type(exc).__name__}: {exc}")
            return 1
    print_report(policy, opa_skipped, counters, samples, args)
    return 0


def print_report(policy: dict[str, Any], opa_skipped: str, counters: dict[str, Any], samples: list[Sample],
                 args: argparse.Namespace) -> None:
    allowed = sum(s.expect_allow for s in samples)
    print(f"policy revision {policy['revision']}; {len(samples)} inputs round robin "
          f"({allowed} allowed, {len(samples) - allowed} denied); {os.cpu_count()} CPUs")
    print("\n".join(policy_table(policy, args)))
    if opa_skipped:
        print(opa_skipped)
    for note in policy["notes"]:
        print(f"note: {note}")
    print()
    print("\n".join(counters_table(counters, args)))
    print(json.dumps(summary(policy, opa_skipped, counters, samples, args), sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
