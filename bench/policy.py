"""What do a policy decision, each rule module and the usage counters cost per request?

Four questions (five with ``--tokens``), answered in the same run (the first and last against a
baseline of their own):

1. **Policy decisions.** The full shipped policy set (``policies/``) is
   evaluated by the embedded engine (regorus in a child process) and by a real
   OPA server that loaded the folder itself (``opa run --server policies/``,
   as in production). Both get the same mix of realistic inputs, built with
   :func:`gateway.requests.policy_input.build_input`: allowed requests, denials by
   role, prompts with PII that content rules redact or deny, a blocked
   pattern, a restricted model with a declared purpose, and usage counters
   just below and at their limits. Each engine runs N decisions one after
   the other, then N with C coroutines in flight; the figure to watch is the
   ratio OPA / embedded, because both sides run back to back under the same
   noise. The OPA figure includes the HTTP client, as the gateway pays it.

   The embedded engine runs as the gateway runs it, with one evaluator per
   core (``--evaluators``), so decisions per second at c=1 show one
   evaluator's latency and at c=32 how far the pool scales with the cores.
   A further pair of phases (c=1, then c=C) reads the CPU each side spends
   per decision: this process standing in for the gateway (encoding the
   input, the pipe round trip on the event loop, reading the decision) and
   the evaluator children (from ``/proc``, clock ticks).

2. **Rule modules.** In this process, on regorus itself (no pipe, no
   pool): the p50 of the whole ``data.govgate.decision`` and of each
   module's main rules on the same inputs (``bench/policy_modules.py``), on
   the wall clock and on the thread's CPU clock (which a busy machine
   disturbs less).

3. **Output decisions** (``bench/policy_output_latency.py``). What the output
   rules add: ``data.govgate.output_decision`` on each engine, one at a
   time, per stream window (1.5 × the hold-back) and per completion (the
   whole output), on plain text and with findings, p50/p99 and this
   process's CPU per decision.

4. **Usage counters.** Against a private Redis on a unix socket, each
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
        [--evaluators N] [--rounds 50] [--no-opa] [--no-counters] [--policy-dir DIR] [--json FILE]
        [--output-decisions 1000] [--no-outputs] [--tokens [--token-model govgate-tiny] [--token-requests 10] [--max-tokens 256]
        [--holdback N]]

``--tokens`` (off by default: it starts a stack) adds tokens/s through a
gateway with the output rules on against the tiny model called directly
(``bench/output_tokens.py``), with the ratio (goal ≥ 0.95, never asserted).

``--json FILE`` writes the figures (the same document as the JSON line) to FILE.

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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

if not __package__:  # run as `python bench/policy.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import percentile, rounded, write_json  # noqa: E402
from bench._stack import (  # noqa: E402
    ROOT,
    TempDir,
    forget_govgate_environment,
    run_interruptible,
    say,
    stop_later,
)
from bench.policy_inputs import Sample, mix_notes, sample_inputs  # noqa: E402
from bench.policy_modules import time_modules  # noqa: E402
from bench.policy_output_latency import bench_outputs, print_outputs  # noqa: E402
from bench.policy_report import print_report  # noqa: E402
from bench.policy_timing import Operation, Run, sequential_and_concurrent, timed  # noqa: E402
from gateway.policy.opa_binary import LOCAL_OPA, find_opa  # noqa: E402

POLICY_DIR = ROOT / "policies"
#: Per-decision timeout of both engines: generous, so a slow machine shows as latency, not as denials.
DECISION_TIMEOUT_S = 5.0
#: Building OPA from source can take minutes on a cold Go cache.
MAKE_OPA_TIMEOUT_S = 1200.0
#: A policy folder being edited may be momentarily broken or change between loads: retry this often.
LOAD_ATTEMPTS = 3
LOAD_RETRY_DELAY_S = 2.0

#: Tokens a counters request reserves and then really uses.
RESERVED_TOKENS = 256
ACTUAL_TOKENS = 97
#: Requests are spread over this many principals, in this many teams, as a busy gateway's would be.
PRINCIPALS = 16
TEAMS = 4
#: Finite (so every limit check runs) but far above what the bench can use.
NON_BINDING = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "tokens_per_day": 10**12,
               "tokens_per_month": 10**13, "in_flight": 10**6}


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


async def load_engines(opa_url: str | None, evaluators: int, policy_dir: Path) -> tuple[Any, Any | None]:
    """Both engines on the same revision of ``policies/``, retried while the folder is being edited.

    OPA read the folder when it started; if the folder changed since, the
    OPA engine refuses to connect (revision mismatch) and the next attempt
    finds the same answer, which is then reported as an error.
    """
    from gateway.policy import EmbeddedPolicyEngine, OpaPolicyEngine, PolicyLoadError

    for attempt in range(1, LOAD_ATTEMPTS + 1):
        embedded = opa = None
        try:
            embedded = EmbeddedPolicyEngine.load(policy_dir, DECISION_TIMEOUT_S, evaluators=evaluators)
            if opa_url is not None:
                opa = await OpaPolicyEngine.connect(opa_url, policy_dir, DECISION_TIMEOUT_S, load=False)
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
    embedded, opa = await load_engines(opa_url, args.evaluators, args.policy_dir)
    try:
        engines = {"embedded": embedded} if opa is None else {"embedded": embedded, "opa": opa}
        notes = await check_mix(engines, samples)
        runs = {}
        for name, engine in engines.items():
            say(f"policy: {name}: {args.warmup} warm-up + {args.decisions} sequential + "
                f"{args.decisions} at concurrency {args.concurrency}")
            runs[name] = await sequential_and_concurrent(decide_operation(engine, samples), args, args.decisions)
        say(f"policy: embedded: CPU per decision, {args.decisions} sequential + {args.decisions} "
            f"at concurrency {args.concurrency}")
        cpu = {mode: await cpu_per_decision(embedded, samples, args.decisions, concurrency)
               for mode, concurrency in (("c=1", 1), (f"c={args.concurrency}", args.concurrency))}
        figures = {"revision": embedded.revision, "runs": runs, "notes": notes, "cpu_per_decision": cpu}
        if not args.no_outputs:
            figures["outputs"] = await bench_outputs(engines, samples, args, say)
        return figures
    finally:
        for engine in (opa, embedded):
            if engine is not None:
                await engine.aclose()


async def cpu_per_decision(engine: Any, samples: list[Sample], count: int, concurrency: int) -> dict[str, Any]:
    """CPU µs per decision of this process (the gateway's side) and of the evaluator children.

    This process's side is ``time.process_time`` (it includes the bench's own
    loop, a few µs); the children's is read from ``/proc`` in clock ticks, so
    a phase must last a good part of a second for the figure to mean much.
    """
    from bench._cpu import Role, RoleProbe

    pids = [pid for pid in engine.evaluator_pids if pid is not None]
    probe = RoleProbe([Role("evaluators", pid, "own") for pid in pids])
    probe.start()
    started = time.process_time()
    run = await timed(decide_operation(engine, samples), count, concurrency)
    gateway_s = time.process_time() - started
    evaluators_s = probe.stop().get("evaluators", 0.0)
    return {"gateway_us": round(gateway_s / count * 1e6, 1), "evaluators_us": round(evaluators_s / count * 1e6, 1),
            "per_s": round(run.per_s, 1), "failures": dict(run.failures)}


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


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=2000, help="decisions per engine and mode (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="coroutines in flight (default 32)")
    parser.add_argument("--requests", type=int, default=None,
                        help="counters requests and PINGs per mode (default: as --decisions)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured operations before each (default 100)")
    parser.add_argument("--no-opa", action="store_true", help="measure the embedded engine only")
    parser.add_argument("--no-counters", action="store_true", help="skip the usage counters part (no Redis)")
    parser.add_argument("--evaluators", type=int, default=None,
                        help="embedded engine's evaluator processes (default: as the gateway, one per core)")
    parser.add_argument("--rounds", type=int, default=50,
                        help="rounds of the input mix for the per-module timing (default 50)")
    parser.add_argument("--policy-dir", type=Path, default=POLICY_DIR,
                        help="the policy folder to measure (default: policies/), e.g. an older revision to compare")
    parser.add_argument("--output-decisions", type=int, default=1000,
                        help="output decisions per engine and kind of window or completion (default 1000)")
    parser.add_argument("--no-outputs", action="store_true", help="skip the output decisions part")
    parser.add_argument("--tokens", action="store_true",
                        help="also measure tokens/s through a gateway with the output rules on against the tiny "
                             "model called directly (bench/output_tokens.py; starts a stack)")
    parser.add_argument("--token-requests", type=int, default=10,
                        help="requests per side of the tokens/s part (default 10)")
    parser.add_argument("--token-model", default="govgate-tiny",
                        help="the model of the tokens/s part: govgate-tiny (default) or gemma-3-270m, a real "
                             "model's pace")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per request of that part (default 256)")
    parser.add_argument("--holdback", type=int, default=None,
                        help="GOVGATE_OUTPUT_HOLDBACK_CHARS of that gateway (default: the setting's default)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    if args.evaluators is None:
        from gateway.settings import Settings

        args.evaluators = Settings().policy_evaluators
    if args.requests is None:
        args.requests = args.decisions
    if args.holdback is None:
        from gateway.settings import Settings

        args.holdback = Settings().output_holdback_chars
    if (args.decisions < 1 or args.requests < 1 or args.concurrency < 1 or args.warmup < 0 or args.evaluators < 1
            or args.rounds < 1 or args.output_decisions < 1 or args.token_requests < 1 or args.max_tokens < 1
            or args.holdback < 1):
        parser.error("--decisions, --requests, --concurrency, --evaluators, --rounds, --output-decisions, "
                     "--token-requests, --max-tokens and --holdback must be at least 1, --warmup at least 0")
    return args


async def measure(opa_url: str | None, redis_url: str | None, samples: list[Sample], args: argparse.Namespace,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Policy first, then the rule modules in this process, then counters: one thing at a time."""
    policy = await bench_policy(opa_url, samples, args, say)
    say(f"policy: rule modules in-process, {args.rounds} rounds of {len(samples)} inputs")
    policy["modules"] = {name: figures.figures() for name, figures in
                         time_modules(args.policy_dir, [s.input for s in samples], args.rounds).items()}
    counters = await bench_counters(redis_url, args, say) if redis_url is not None else None
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
                    opa = OpaServer(binary, work_dir, args.policy_dir).start()
                    stop_later(stack, opa.stop)
                    opa_url = opa.url
            if opa_skipped:
                say(opa_skipped)
            redis_url = None
            if not args.no_counters:
                say("redis: starting …")
                redis = RedisProcess.start(work_dir / "redis", persist=False)
                stop_later(stack, redis.stop)
                redis_url = redis.url
            policy, counters = asyncio.run(measure(opa_url, redis_url, samples, args, say))
        except (PolicyLoadError, RedisUnavailable, RuntimeError, TimeoutError, OSError) as exc:
            say(f"bench: {type(exc).__name__}: {exc}")
            return 1
    document = print_report(policy, opa_skipped, counters, samples, args)
    if policy.get("outputs"):
        print_outputs(policy["outputs"])
        document["outputs"] = policy["outputs"]
    if args.tokens:
        from bench._stack import in_temp_dir
        from bench.output_tokens import measure_tokens, print_tokens
        from govgate.redis_server import RedisUnavailable
        from govgate.stack import StartupError

        tokens = in_temp_dir(lambda var_dir: measure_tokens(var_dir, args.token_requests, args.max_tokens,
                                                            args.holdback, say, args.token_model),
                             (StartupError, RedisUnavailable, TimeoutError, OSError))
        if tokens is None:
            return 1
        print_tokens(tokens)
        document["tokens"] = tokens
    if args.json is not None:
        write_json(args.json, document)
        say(f"bench: figures written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
