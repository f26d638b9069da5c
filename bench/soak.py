"""Faults, measured: does every promise of the audit hold while parts of the stack die?

Starts a private stack on loopback and a unix socket (Redis with its
append-only file, as ``govgate up`` runs it; two tiny-model workers; two
``govgate serve`` gateways, fair share and the solo pool as by default) in a
temporary folder, then sends requests (chat and text, streaming and not, ~16
at a time, alternating between the gateways) while it injects faults on a
schedule, one after another. The requests come from two teams of equal
share, each with its own principal and key: ``steady`` keeps the workers
busy (all clients but one in eight, each sending its next request as soon as
the last ended), ``trickle`` trickles in (the other clients, each pausing up
to 0.1 s before each request), so a trickle job is often pushed to an empty
list just after a worker took a steady one: the taken job's start gives way
(docs/architecture.md, "A start that gives way"), under the faults too.
The faults:

* ``worker_kill``: SIGKILL a whole worker (main process and pool child at
  once), then start a replacement;
* ``pool_kill``: SIGKILL a worker's pool child (Celery forks a new one); with
  the solo pool (``GOVGATE_WORKER_POOL``, the default) the job runs in the
  worker itself, so its worker is killed and started again, as ``worker_kill``;
* ``redis_restart`` / ``redis_kill``: stop Redis (SIGTERM / SIGKILL), start
  it again on the same socket and data folder a few seconds later;
* ``gateway_term`` / ``gateway_kill``: stop a gateway (SIGTERM / SIGKILL) and
  start it again on the same port;
* ``client_disconnect``: the next few streaming clients hang up after their
  first piece of text;
* with ``--database postgres`` (the audit store on a PostgreSQL server of the
  run's own, ``bench/soak_database.py``), after those: ``db_sessions_kill``
  (``pg_terminate_backend`` of every session on the store's database, under
  the gateways' and workers' kept connections), ``db_restart`` (a fast
  shutdown, the server down a few seconds) and ``db_crash`` (SIGQUIT: no
  checkpoint, recovered from the WAL at its start).

It prints the count of each outcome (status and error code; a stream ended
with ``[DONE]`` or with an error event; a client disconnect; a transport
error), each team's requests and answers, how many jobs gave way at their
start during the run (``gw`` in the model's tags hash, read before and
after), the recovery time after each fault (from the fault to the end of the
first successful request sent once the killed process was gone, through the
same gateway for gateway faults), and then checks the audit store:

* every served answer (a 200, or a stream that ended with ``[DONE]``) has
  exactly one ``request`` entry and a ``completion`` entry whose output is
  exactly the text the client got;
* a stream cut short (error event, disconnect, broken connection) that had
  already delivered text has a terminal entry whose output holds every piece
  delivered, in order;
* every accepted request has exactly one terminal entry (waiting, bounded,
  for entries that a rescuer writes after the broker's visibility timeout);
* no request id has two ``request`` entries;
* ``audit verify`` passes;
* every error answer is OpenAI-shaped, and none is a 500;
* no process the soak did not kill itself exited.

It ends with a verdict line and exits 1 if any check fails. Nothing here
asserts a timing. The core is :func:`run_soak`, which ``tests/e2e/test_soak.py``
calls for a short run.

Usage::

    .venv/bin/python bench/soak.py [--requests 3000] [--concurrency 16] [--duration 900]
                                   [--faults worker_kill,pool_kill,...] [--database sqlite|postgres]
                                   [--no-give-way] [--json]

``--no-give-way`` runs the stack with ``GOVGATE_FAIR_GIVE_WAY=0`` (to tell
whether a failed promise comes from the give-way).

Everything started here is stopped at the end, also on Ctrl-C, SIGTERM or an
error; if this process is killed outright, its children receive SIGTERM
(``PR_SET_PDEATHSIG``). The temporary folder is removed (``--keep`` keeps it,
with every process's log, and prints where).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

if not __package__:  # run as `python bench/soak.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._stack import TempDir, run_interruptible, say, signals_deferred  # noqa: E402
from bench._teams import Team  # noqa: E402
from bench.soak_audit import Check, Fault, Sent, accepted, audit_checks, log_problems, wait_for_terminals  # noqa: E402
from bench.soak_database import SoakDatabase  # noqa: E402
from bench.soak_client import CHAT_PATH, DISCONNECTED, TEXT_PATH, request_body, send_request  # noqa: E402
from bench.soak_report import SoakReport  # noqa: E402
from bench.soak_stack import SoakStack  # noqa: E402

WORKER_KILL = "worker_kill"
POOL_KILL = "pool_kill"
REDIS_RESTART = "redis_restart"
REDIS_KILL = "redis_kill"
GATEWAY_TERM = "gateway_term"
GATEWAY_KILL = "gateway_kill"
CLIENT_DISCONNECT = "client_disconnect"
DB_SESSIONS_KILL = "db_sessions_kill"
DB_RESTART = "db_restart"
DB_CRASH = "db_crash"
#: Every kind of fault of a default run (SQLite), in the order it injects them.
FAULT_KINDS = (POOL_KILL, WORKER_KILL, REDIS_RESTART, GATEWAY_TERM, CLIENT_DISCONNECT, GATEWAY_KILL, REDIS_KILL)
#: The database's faults (``--database postgres`` only), which such a run injects after the others.
DB_FAULT_KINDS = (DB_SESSIONS_KILL, DB_RESTART, DB_CRASH)
ALL_FAULT_KINDS = FAULT_KINDS + DB_FAULT_KINDS
_GATEWAY_FAULTS = (GATEWAY_TERM, GATEWAY_KILL)

#: How long Redis stays down in a Redis fault (the issue's follow-up used 5 s).
REDIS_DOWN_S = 3.0
#: The gateways' request timeout: a job lost with a worker ends (504) after this.
REQUEST_TIMEOUT_S = 15.0
#: A generation's soft limit in the workers; the broker's visibility timeout
#: (when a dead worker's task goes to another) is this + 10 s + the redelivery margin.
GENERATION_LIMIT_S = 2.0
#: The redelivery margin (``GOVGATE_REDELIVERY_MARGIN_S``): the product's default, 30 s.
REDELIVERY_MARGIN_S = 30.0
#: The team that keeps the workers busy and the one that trickles in; equal shares, so the trickle's
#: lists come first whenever they hold a job.
STEADY, TRICKLE = Team("steady", 1.0), Team("trickle", 1.0)
TEAMS = (STEADY, TRICKLE)
#: One client in this many is a trickle client (at least one).
TRICKLE_EVERY = 8
#: A trickle client pauses a random time up to this before each request: its list is empty most of the
#: time, so its pushes land anywhere in the steady jobs' hand-overs.
TRICKLE_PAUSE_S = 0.1


# ---------------------------------------------------------------- traffic


@dataclass
class Plan:
    """What the traffic and the fault schedule share while the soak runs."""

    requests: int
    concurrency: int
    deadline: float
    faults: list[str]
    stream_share: float
    max_tokens: int
    disconnects_per_fault: int
    request_timeout_s: float
    seed: int = 7

    @property
    def trickle_clients(self) -> int:
        """How many of the clients are the trickle team's (the rest are the steady team's)."""
        return max(1, self.concurrency // TRICKLE_EVERY) if self.concurrency > 1 else 0


class Traffic:
    """Clients sending requests, and the schedule injecting faults between them."""

    def __init__(self, stack: SoakStack, plan: Plan, say: Callable[[str], None],
                 database: SoakDatabase | None = None) -> None:
        self.stack = stack
        self.plan = plan
        self.say = say
        #: The PostgreSQL audit store and its faults (None: the stack's SQLite file).
        self.database = database
        self.sent: list[Sent] = []
        self.faults: list[Fault] = []
        self.disconnects_left = 0
        self.faults_done = False
        #: Why the schedule stopped early (a restarted part never answered), if it did.
        self.schedule_error: str | None = None
        self.random = random.Random(plan.seed)

    async def run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.plan.concurrency, max_keepalive_connections=self.plan.concurrency)
        timeout = httpx.Timeout(self.plan.request_timeout_s + 30, connect=5)
        clients = {team.name: [httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout,
                                                 headers={"Authorization": f"Bearer {self.stack.keys[team.name]}"})
                               for url in self.stack.urls] for team in TEAMS}
        trickle = self.plan.trickle_clients
        loops = [self._loop(TRICKLE.name, clients[TRICKLE.name], TRICKLE_PAUSE_S) for _ in range(trickle)]
        loops += [self._loop(STEADY.name, clients[STEADY.name], 0.0)
                  for _ in range(self.plan.concurrency - trickle)]
        try:
            schedule = asyncio.create_task(self._schedule())
            await asyncio.gather(*loops)
            if not schedule.done():  # the deadline passed first
                schedule.cancel()
            await asyncio.gather(schedule, return_exceptions=True)
        finally:
            for team_clients in clients.values():
                for client in team_clients:
                    await client.aclose()

    def _more(self) -> bool:
        if time.monotonic() >= self.plan.deadline:
            return False
        return len(self.sent) < self.plan.requests or not self.faults_done

    async def _loop(self, team: str, clients: list[Any], pause_s: float) -> None:
        """One client of ``team`` (one key, a connection pool per gateway), pausing up to ``pause_s``
        before each request."""
        while True:
            if pause_s:
                await asyncio.sleep(self.random.uniform(0, pause_s))
            if not self._more():
                return
            index = len(self.sent)
            record = Sent(index=index, gateway=index % len(clients), stream=False, started=time.monotonic(),
                          team=team)
            self.sent.append(record)
            disconnect = False
            if self.disconnects_left > 0:
                self.disconnects_left -= 1
                disconnect = True
            record.stream = disconnect or self.random.random() < self.plan.stream_share
            chat = self.random.random() < 0.5
            max_tokens = self.random.randint(2, self.plan.max_tokens)
            body = request_body(self.stack.model, index, chat, record.stream, max_tokens)
            bound = self.plan.request_timeout_s * 2 + 30
            try:
                async with asyncio.timeout(bound):
                    await send_request(clients[record.gateway], CHAT_PATH if chat else TEXT_PATH, body, record,
                                       chat, disconnect)
            except TimeoutError:
                record.outcome = record.outcome or f"no answer within {bound:g}s"
            record.ended = time.monotonic()
            if not record.served and record.outcome != DISCONNECTED:
                # A client backs off on errors; spinning would only count refusals.
                await asyncio.sleep(1.0 if record.outcome.startswith("transport") else 0.25)

    async def _schedule(self) -> None:
        """Each fault at its share of the requests, once the previous one has recovered (bounded)."""
        try:
            count = len(self.plan.faults)
            for number, kind in enumerate(self.plan.faults, start=1):
                mark = number * self.plan.requests // (count + 1)
                while len(self.sent) < mark and time.monotonic() < self.plan.deadline:
                    await asyncio.sleep(0.05)
                if time.monotonic() >= self.plan.deadline:
                    self.say(f"soak: deadline reached before fault {kind}")
                    return
                try:
                    fault = await self._inject(kind, number)
                except (RuntimeError, TimeoutError, OSError) as exc:  # a part did not come back: stop here
                    self.schedule_error = f"{kind}: {type(exc).__name__}: {exc}"
                    self.say(f"soak: fault {kind} failed: {exc}; ending the run")
                    self.plan.deadline = time.monotonic()
                    return
                self.faults.append(fault)
                self.say(f"soak: fault {number}/{count} {kind}: {fault.detail}")
                await self._await_recovery(fault)
        finally:
            self.faults_done = True

    async def _inject(self, kind: str, number: int) -> Fault:
        stack = self.stack
        at, wall = time.monotonic(), time.time()
        stack.down_at = None
        gateway = None

        async def in_fault_thread(function: Callable[..., Any], *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(stack.fault_thread, function, *args)

        if kind == WORKER_KILL:
            detail, restart = await in_fault_thread(stack.kill_worker, 0)
        elif kind == POOL_KILL:
            detail, restart = await in_fault_thread(stack.kill_pool_child, 0)
        elif kind in (REDIS_RESTART, REDIS_KILL):
            sig = signal.SIGTERM if kind == REDIS_RESTART else signal.SIGKILL
            detail, restart = await in_fault_thread(stack.restart_redis, sig, REDIS_DOWN_S)
        elif kind in _GATEWAY_FAULTS:
            gateway = number % len(stack.ports)
            sig = signal.SIGTERM if kind == GATEWAY_TERM else signal.SIGKILL
            detail, restart = await in_fault_thread(stack.restart_gateway, gateway, sig)
        elif kind == CLIENT_DISCONNECT:
            self.disconnects_left = self.plan.disconnects_per_fault
            detail, restart = f"next {self.plan.disconnects_per_fault} clients hang up mid-stream", None
        elif kind in DB_FAULT_KINDS and self.database is not None:
            database = self.database
            if kind == DB_SESSIONS_KILL:
                detail, restart = await in_fault_thread(database.kill_sessions)
            else:
                detail, restart = await in_fault_thread(lambda: database.restart(crash=kind == DB_CRASH))
            stack.down_at = database.down_at
        else:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(ALL_FAULT_KINDS)}")
        return Fault(kind=kind, at=at, wall=wall, down_at=stack.down_at or at, detail=detail, restart_s=restart,
                     gateway=gateway)

    async def _await_recovery(self, fault: Fault, timeout_s: float | None = None) -> None:
        """Wait (bounded) for a success after the fault, so faults are told apart."""
        limit = time.monotonic() + (timeout_s or self.plan.request_timeout_s * 2 + 30)
        while time.monotonic() < min(limit, self.plan.deadline):
            if recovery_of(fault, self.sent) is not None:
                return
            await asyncio.sleep(0.1)


def recovery_of(fault: Fault, sent: Iterable[Sent]) -> float | None:
    """Seconds from ``fault`` to the end of the first success sent once its victim was gone.

    Through the same gateway for gateway faults. A request sent between the
    signal and the victim's exit (a gateway draining after SIGTERM) does not
    count: it did not need the stack to recover.
    """
    ends = [r.ended for r in list(sent) if r.served and r.ended and r.started >= (fault.down_at or fault.at)
            and (fault.gateway is None or r.gateway == fault.gateway)]
    return min(ends) - fault.at if ends else None


def team_outcomes(sent: Iterable[Sent]) -> dict[str, Counter]:
    """Each team's outcomes, every team of the soak present (with no requests: empty)."""
    found: dict[str, Counter] = {team.name: Counter() for team in TEAMS}
    for record in sent:
        found.setdefault(record.team, Counter())[record.outcome] += 1
    return found


# ---------------------------------------------------------------- the run


def run_soak(*, requests: int = 3000, concurrency: int = 16, faults: Iterable[str] = FAULT_KINDS,
             duration_s: float = 900.0, stream_share: float = 0.5, max_tokens: int = 24,
             disconnects_per_fault: int = 6, workers: int = 2, gateways: int = 2,
             request_timeout_s: float = REQUEST_TIMEOUT_S, generation_limit_s: float = GENERATION_LIMIT_S,
             redelivery_margin_s: float = REDELIVERY_MARGIN_S, settle_s: float | None = None,
             keep_dir: bool = False, worker_pool: str | None = None, give_way: bool | None = None,
             database: str = "sqlite", say: Callable[[str], None] = lambda line: None) -> SoakReport:
    """Start a stack, send ``requests`` while injecting ``faults``, check the audit, stop everything.

    Sends at least ``requests`` (more if the faults are not all done by then)
    unless ``duration_s`` passes first. ``settle_s`` bounds the wait for late
    terminal entries afterwards; by default until the gateways' lost-request
    sweep has ended what no worker will, plus a margin. ``redelivery_margin_s``
    is the stack's ``GOVGATE_REDELIVERY_MARGIN_S`` (workers and gateways): a
    shorter one hands a dead worker's task on sooner and lets the sweep call a
    request lost sooner, so a short run ends sooner (tests/e2e/test_soak.py).
    ``give_way`` is the stack's ``GOVGATE_FAIR_GIVE_WAY`` (None: the default).
    ``database`` is ``sqlite`` (the stack's file, the default) or ``postgres``
    (a server of the run's own, ``bench/soak_database.py``; its faults then
    allowed).
    """
    from audit import AuditStore, make_engine, verify_chain
    from gateway.requests.lost_requests import SWEEP_INTERVAL_S, lost_after_s

    faults = list(faults)
    known = ALL_FAULT_KINDS if database == "postgres" else FAULT_KINDS
    for kind in faults:
        if kind not in known:
            raise ValueError(f"unknown fault {kind!r} for database {database}; known: {', '.join(known)}")
    if settle_s is None:
        # By then every accepted request has ended: a late worker's entry, or the
        # gateways' lost-request sweep (one more sweep round, and a margin for a busy machine).
        settle_s = lost_after_s(request_timeout_s, generation_limit_s, redelivery_margin_s) + 2 * SWEEP_INTERVAL_S + 10
    temp = TempDir()  # children get only the stack's settings: child_env drops inherited GOVGATE_* variables
    stack: SoakStack | None = None
    store: SoakDatabase | None = None
    try:
        if database == "postgres":
            store = SoakDatabase()
            say(f"soak: the audit store on PostgreSQL ({store.server.host}:{store.server.port}/{store.name})")
        say(f"soak: starting the stack in {temp.path}")
        stack = SoakStack(temp.path, workers=workers, gateways=gateways, request_timeout_s=request_timeout_s,
                          generation_limit_s=generation_limit_s, redelivery_margin_s=redelivery_margin_s,
                          teams=list(TEAMS), worker_pool=worker_pool, give_way=give_way,
                          database_url=store.url if store is not None else None)
        stack.start()
        gave_way_before = stack.gave_way()
        plan = Plan(requests=requests, concurrency=concurrency, deadline=time.monotonic() + duration_s,
                    faults=faults, stream_share=stream_share, max_tokens=max_tokens,
                    disconnects_per_fault=disconnects_per_fault, request_timeout_s=request_timeout_s)
        say(f"soak: {requests} requests at concurrency {concurrency} ({plan.trickle_clients} clients of team "
            f"{TRICKLE.name}, the rest of team {STEADY.name}), {stack.settings.worker_pool} workers, "
            f"{stack.settings.queue_mode} queues, give-way {'on' if stack.settings.fair_give_way else 'off'}, "
            f"faults: {', '.join(faults) or 'none'}")
        traffic = Traffic(stack, plan, say, store)
        started = time.monotonic()
        asyncio.run(traffic.run())
        wall = time.monotonic() - started
        for fault in traffic.faults:
            fault.recovery_s = recovery_of(fault, traffic.sent)
        engine = make_engine(stack.settings.effective_database_url)
        try:
            by_request = wait_for_terminals(AuditStore(engine), settle_s, say)
            verified = verify_chain(engine)
        finally:
            engine.dispose()
        gave_way_after = stack.gave_way()
        gave_way = None if gave_way_before is None or gave_way_after is None else gave_way_after - gave_way_before
        checks = audit_checks(traffic.sent, by_request, verified, stack.unplanned_exits(), traffic.faults,
                              request_timeout_s)
        missing = [kind for kind in faults if kind not in {f.kind for f in traffic.faults}]
        why = traffic.schedule_error or "deadline"
        checks["all_faults_injected"] = Check(ok=not missing, failures=len(missing),
                                              examples=[f"never injected ({why}): {missing}"] if missing else [])
        return SoakReport(requests=len(traffic.sent), concurrency=concurrency, wall_s=wall,
                          outcomes=Counter(r.outcome for r in traffic.sent), faults=traffic.faults, checks=checks,
                          audit_entries=sum(len(v) for v in by_request.values()),
                          accepted=sum(1 for v in by_request.values() if accepted(v)),
                          log_problems=log_problems(stack.logs), teams=team_outcomes(traffic.sent),
                          gave_way=gave_way, give_way_on=stack.settings.fair_give_way)
    finally:
        with signals_deferred():
            if stack is not None:
                stack.stop()
            if store is not None:
                store.stop()
            if keep_dir:
                say(f"soak: kept {temp.path} (logs in {temp.path / 'logs'})")
            else:
                temp.__exit__(None, None, None)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests to send, at least (default 3000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--duration", type=float, default=900.0, help="stop sending after this many seconds")
    parser.add_argument("--faults", help=f"comma-separated, injected in this order (default: "
                        f"{','.join(FAULT_KINDS)}, and with --database postgres then {','.join(DB_FAULT_KINDS)})")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="the audit store: the stack's SQLite file (default), or a PostgreSQL server of the "
                             "run's own (initdb on loopback; PostgreSQL's server binaries needed)")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests (0..1)")
    parser.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens asked (default 24)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    parser.add_argument("--worker-pool", choices=("prefork", "solo"),
                        help="GOVGATE_WORKER_POOL of the workers (default: the setting's default)")
    parser.add_argument("--no-give-way", dest="give_way", action="store_false", default=None,
                        help="run the stack with GOVGATE_FAIR_GIVE_WAY=0 (a fair job's start never gives way)")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    args = parser.parse_args(argv)
    known = ALL_FAULT_KINDS if args.database == "postgres" else FAULT_KINDS
    if args.faults is None:
        args.faults = ",".join(known)
    args.fault_list = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.fault_list if f not in known]
    if unknown:
        parser.error(f"unknown faults {unknown} for --database {args.database}; known: {', '.join(known)}")
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 2:
        parser.error("--requests, --concurrency and --duration must be positive, --max-tokens at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        try:
            report = run_soak(requests=args.requests, concurrency=args.concurrency, faults=args.fault_list,
                              duration_s=args.duration, stream_share=args.stream_share, max_tokens=args.max_tokens,
                              keep_dir=args.keep, worker_pool=args.worker_pool, give_way=args.give_way,
                              database=args.database, say=say)
        except (RuntimeError, TimeoutError, OSError) as exc:
            say(f"soak: {type(exc).__name__}: {exc}")
            return 1
        print(report.render())
        if args.json:
            print(json.dumps(report.to_document(), sort_keys=True))
        return 0 if report.ok else 1

    return run_interruptible(run, "soak")


if __name__ == "__main__":
    sys.exit(main())
