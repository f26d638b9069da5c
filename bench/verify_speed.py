"""How fast does ``verify`` check a large format-2 store: entries/s, wall clock, on SQLite and PostgreSQL.

Builds a store of ``--entries`` format-2 entries (default 200,000), each
with a ~1 KB body and a ~1 KB payload, then times :func:`audit.verify_chain`
over it with one worker and with ``--jobs`` workers (default: the cores).
The store is built quickly but faithfully: the first entry goes through
:class:`audit.AuditStore` (which writes the ``chain_format`` boundary), the
rest through the store's own compiled insert (:class:`audit.appender.Appender`,
the very statement and column processing ``AuditStore.append`` uses) inside
large transactions instead of one per entry. The bench fails if the chain
does not verify. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/verify_speed.py [--entries 200000] [--jobs N ...] [--backend sqlite|postgresql|both]
                                           [--postgres-url URL | --store-url URL] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as `python bench/verify_speed.py`: import the packages from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit import AuditStore, make_engine, migrate, verify_chain  # noqa: E402
from audit.append_plan import append_statements  # noqa: E402
from audit.appender import Appender  # noqa: E402
from audit.writer import writer_for  # noqa: E402
from audit.chain import FORMAT_2, canonical_text, payload_digest  # noqa: E402
from audit.dbapi import dbapi_cursor  # noqa: E402
from bench._figures import rounded, write_json  # noqa: E402

#: Rows per transaction while building.
BUILD_BATCH = 5000
#: ~1 KB of chained metadata per entry (the gateway's request bodies are of this size).
BODY: dict[str, Any] = {
    "endpoint": "/v1/chat/completions", "key_id": "key_7f3a91c2", "roles": ["analyst", "reviewer"], "stream": False,
    "params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256, "stop": ["\n\n"], "seed": None},
    "decision": {"allow": True, "reasons": [], "obligations": {"max_tokens": 256, "prompt_logging": "full"},
                 "policy": "govgate/allow", "notes": "matched team rule research-models, daily budget ok " * 4},
    "admission": {"queue": "tiny", "depth": 3, "reserved_tokens": 512, "prompt_tokens": 97}, "prompt_logging": "full",
    "policy_input": {"principal": {"id": "user-1", "team": "research", "roles": ["analyst"]}, "model": "tiny",
                     "labels": ["émigré", "naïve", "日本語"], "usage_today": {"tokens": 123456, "requests": 789}},
}
#: ~1 KB of erasable text per entry.
PAYLOAD: dict[str, Any] = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the quarterly report for the board in three bullet points, "
                                "naming the revenue, the costs and the outlook for the next quarter. " * 6}]}


def build(url: str, entries: int) -> float:
    """Fill a fresh store at ``url`` with ``entries`` entries (the boundary included); returns seconds taken."""
    began = time.perf_counter()
    engine = make_engine(url)
    migrate(engine)
    store = AuditStore(engine)
    store.append("request", "r-0", principal="user-0", team="research", model="tiny", body=BODY,
                 payload=PAYLOAD, policy_revision="rev-1")  # entry 1 the boundary, entry 2 this one
    head = store.head()
    assert head is not None
    appender = Appender(append_statements(engine), lambda: writer_for(engine))  # only its _insert is used
    seq, prev = head.seq, head.hash
    moment = head.created_at
    while seq < entries:
        with dbapi_cursor(engine) as cursor:
            for _ in range(min(BUILD_BATCH, entries - seq)):
                seq += 1
                moment += timedelta(microseconds=1379)
                body = canonical_text({**BODY, "n": seq})
                payload = canonical_text({**PAYLOAD, "salt": f"{seq:032x}"})
                kind, rid = ("request", f"r-{seq}") if seq % 2 else ("completion", f"r-{seq - 1}")
                fields = {"request_id": rid, "kind": kind, "principal": f"user-{seq % 17}", "team": "research",
                          "model": "tiny", "policy_revision": "rev-1",
                          "terminal_request_id": rid if kind == "completion" else None,
                          "payload_digest": payload_digest(payload.encode())}
                prev = appender._insert(cursor, fields, seq, prev, moment, body, payload, FORMAT_2).hash
    engine.dispose()
    return time.perf_counter() - began


def time_verify(url: str, entries: int, workers: int) -> dict[str, Any]:
    """One timed verify: wall clock, the parent's CPU, and the CPU of the parent and its workers together."""
    engine = make_engine(url)
    try:
        wall, cpu, total = time.perf_counter(), time.process_time(), _cpu_s()
        result = verify_chain(engine, workers=workers)
        wall, cpu, total = time.perf_counter() - wall, time.process_time() - cpu, _cpu_s() - total
    finally:
        engine.dispose()
    if not result.ok or result.checked != entries:
        raise RuntimeError(f"the bench's chain does not verify: {result}")
    return {"entries_per_s": rounded(entries / wall), "wall_s": rounded(wall, 2),
            "parent_cpu_us_per_entry": rounded(cpu / entries * 1e6, 2),
            "cpu_us_per_entry": rounded(total / entries * 1e6, 2), "load_average": rounded(os.getloadavg()[0], 2)}


def _cpu_s() -> float:
    """CPU seconds of this process and of its ended children (verify joins its workers before it returns)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(url: str, entries: int, jobs: list[int], repeat: int, *, built: bool = False) -> dict[str, Any]:
    figures: dict[str, Any] = {} if built else {"build_s": rounded(build(url, entries), 1)}
    time_verify(url, entries, 1)  # the file in the page cache, the server's buffers warm, alike for every figure
    for workers in jobs:
        runs = [time_verify(url, entries, workers) for _ in range(repeat)]
        best = max(runs, key=lambda run: run["entries_per_s"])
        figures[f"workers_{workers}"] = {**best, "all_entries_per_s": [run["entries_per_s"] for run in runs]}
    return figures


def on_postgres(args: argparse.Namespace, run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from tests.postgres_server import PostgresServer, PostgresUnavailable  # the suite's own server helper

    try:
        server = PostgresServer.attach(args.postgres_url) if args.postgres_url else PostgresServer.start()
    except PostgresUnavailable as exc:
        return {"skipped": str(exc)}
    url = server.fresh_database("bench_verify")
    try:
        return run(url)
    finally:
        server.drop_database(url)
        if not args.postgres_url:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--jobs", type=int, action="append",
                        help="worker counts to time (repeatable; default 1 and the cores)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--postgres-url", help="a PostgreSQL superuser URL to create the bench's database on")
    parser.add_argument("--store-url", help="time an existing store of --entries entries instead (no build)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    jobs: list[int] = list(args.jobs or [1, os.cpu_count() or 1])
    document: dict[str, Any] = {"entries": args.entries, "cores": os.cpu_count(), "backends": {}}
    run = lambda url: measure(url, args.entries, jobs, args.repeat)  # noqa: E731
    if args.store_url:
        document["backends"]["given"] = measure(args.store_url, args.entries, jobs, args.repeat, built=True)
    elif args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="gg-bench-verify-") as folder:
            document["backends"]["sqlite"] = run(f"sqlite:///{folder}/audit.db")
    if not args.store_url and args.backend in ("postgresql", "both"):
        document["backends"]["postgresql"] = on_postgres(args, run)
    for name, figures in document["backends"].items():
        print(name, figures)
    if args.json:
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
