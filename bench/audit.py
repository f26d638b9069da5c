"""How fast is the audit store on each backend: chained appends (one writer, four at once) and verify.

For SQLite (a file in WAL mode) and PostgreSQL (a real server: the one
``tests/postgres_server.py`` starts, ``initdb`` into a temporary folder on
loopback with ``fsync=off``, or ``--postgres-url`` of a server you run), each
opened the way the product opens it (:func:`audit.make_engine`,
:func:`audit.migrate`, :class:`audit.AuditStore`):

- **1 writer**: one process appends request/completion pairs, a ~1 KB entry
  each (metadata in the chained body, the prompt or output in the erasable
  payload), one transaction per append, as the gateway and workers do.
- **4 writers**: four processes (spawned, each with its own engine) append
  at once, all holding the one write lock in turn (SQLite ``BEGIN
  IMMEDIATE``, PostgreSQL ``pg_advisory_xact_lock``); the figure is all
  their appends over the wall time from the common start to the last one's
  end. The chain must come out whole: the bench verifies it and fails if not.
- **verify**: :func:`audit.verify_chain` over the store just written, entries/s.

PostgreSQL's figures from a test server with ``fsync=off`` leave out the
disk's flush, which a production server pays at every commit; SQLite runs
with ``synchronous=NORMAL`` as the product does (WAL, no flush per commit).
Search, a request's story and export MB/s need modules (``audit/search.py``,
``audit/export.py``) that this checkout may not have; their figures are
reported as absent, with the reason, when it does not. Nothing here asserts
a timing.

Usage::

    .venv/bin/python bench/audit.py [--appends 4000] [--quick] [--postgres-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as `python bench/audit.py`: import the packages from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit import AuditStore, make_engine, migrate, verify_chain  # noqa: E402
from bench._figures import rounded, write_json  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")
WRITERS = 4
JOIN_TIMEOUT_S = 600

#: A request entry's chained metadata and its erasable payload, about 1 KB together.
REQUEST_BODY: dict[str, Any] = {
    "endpoint": "/v1/chat/completions", "key_id": "key_7f3a91c2", "roles": ["analyst"], "stream": False,
    "params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256, "stop": ["\n\n"], "seed": None},
    "decision": {"allow": True, "reasons": [], "obligations": {"max_tokens": 256, "prompt_logging": "full"}},
    "admission": {"queue": "tiny", "depth": 3, "reserved_tokens": 512}, "prompt_logging": "full",
}
REQUEST_PAYLOAD: dict[str, Any] = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarise the quarterly report for the board in three bullet points, "
                                "naming the revenue, the costs and the outlook for the next quarter. " * 3}]}
COMPLETION_BODY: dict[str, Any] = {"finish_reason": "stop", "usage": {"prompt_tokens": 97, "completion_tokens": 61},
                                   "worker": "celery@host-1", "duration_ms": 812.5}
COMPLETION_PAYLOAD: dict[str, Any] = {"output": "- Revenue rose 12 % on the quarter.\n- Costs were flat.\n"
                                                "- The outlook is cautious. " * 4}


def append_pairs(store: AuditStore, prefix: str, count: int) -> None:
    """``count`` appends: request/completion pairs of one principal."""
    for i in range(count):
        rid = f"{prefix}-{i // 2}"
        if i % 2 == 0:
            store.append("request", rid, principal=prefix, team="blue", model="tiny", body=REQUEST_BODY,
                         payload=REQUEST_PAYLOAD, policy_revision="rev-1")
        else:
            store.append("completion", rid, principal=prefix, team="blue", model="tiny", body=COMPLETION_BODY,
                         payload=COMPLETION_PAYLOAD, policy_revision="rev-1")


def _writer(url: str, prefix: str, count: int, ready: Any, start: Any, done: Any) -> None:
    """Child process: open the store, wait for the common start, append, report the end time."""
    store = AuditStore(make_engine(url))
    store.tail(1)  # connect before the clock starts
    ready.put(prefix)
    start.wait()
    append_pairs(store, prefix, count)
    done.put(time.monotonic())
    store.engine.dispose()


def one_writer(url: str, count: int) -> dict[str, Any]:
    store = AuditStore(make_engine(url))
    store.tail(1)
    wall, cpu = time.perf_counter(), time.process_time()
    append_pairs(store, "solo", count)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store.engine.dispose()
    return {"appends": count, "appends_per_s": rounded(count / wall), "cpu_ms_per_append": rounded(cpu / count * 1000, 3)}


def many_writers(url: str, count: int, writers: int = WRITERS) -> dict[str, Any]:
    """``count`` appends split over ``writers`` processes appending at once (time.monotonic is system-wide)."""
    per = count // writers
    ready, done, start = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    processes = [SPAWN.Process(target=_writer, args=(url, f"w{w}", per, ready, start, done)) for w in range(writers)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=JOIN_TIMEOUT_S)
        began = time.monotonic()
        start.set()
        ended = max(done.get(timeout=JOIN_TIMEOUT_S) for _ in processes)
    finally:
        for process in processes:
            process.join(JOIN_TIMEOUT_S)
    codes = [p.exitcode for p in processes]
    if codes != [0] * writers:
        raise RuntimeError(f"writers exited with {codes}")
    return {"writers": writers, "appends": per * writers, "appends_per_s": rounded(per * writers / (ended - began))}


def verify_speed(url: str, expected: int) -> dict[str, Any]:
    store = AuditStore(make_engine(url))
    wall = time.perf_counter()
    result = verify_chain(store)
    wall = time.perf_counter() - wall
    store.engine.dispose()
    if not result.ok or result.checked != expected:
        raise RuntimeError(f"the chain written by the bench does not verify: {result}")
    return {"entries": result.checked, "entries_per_s": rounded(result.checked / wall)}


def measure(make_url: Callable[[], str], appends: int) -> dict[str, Any]:
    """Both append figures on fresh databases, then verify the four writers' chain."""
    figures: dict[str, Any] = {}
    for name, run in (("one_writer", one_writer), ("four_writers", many_writers)):
        url = make_url()
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        figures[name] = run(url, appends)
    # The store the four writers filled: their appends and the chain_format boundary.
    figures["verify"] = verify_speed(url, figures["four_writers"]["appends"] + 1)
    return figures


def absent(module: str) -> str | None:
    """Why a figure is missing, or None when ``audit.<module>`` exists in this checkout."""
    return None if importlib.util.find_spec(f"audit.{module}") else f"audit/{module}.py is not in this checkout"


def run(args: argparse.Namespace) -> dict[str, Any]:
    appends = 400 if args.quick else args.appends
    document: dict[str, Any] = {"appends": appends, "entry_bytes_about": 1000, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="gg-bench-audit-") as folder:
        made = iter(range(1_000_000))
        document["backends"]["sqlite"] = measure(lambda: f"sqlite:///{folder}/audit{next(made)}.db", appends)
    document["backends"]["postgresql"] = postgres_figures(args, appends)
    document["not_measured"] = {name: why for name, why in
                                (("search", absent("search")), ("export", absent("export"))) if why}
    return document


def postgres_figures(args: argparse.Namespace, appends: int) -> dict[str, Any]:
    from tests.postgres_server import PostgresServer, PostgresUnavailable  # the suite's own server helper

    if args.postgres_url:
        server = PostgresServer.attach(args.postgres_url)
        note = "the server given by --postgres-url"
    else:
        try:
            server = PostgresServer.start()
        except PostgresUnavailable as exc:
            return {"skipped": str(exc)}
        note = "a test server: initdb on loopback, fsync=off (no flush per commit)"
    made: list[str] = []
    try:
        def make_url() -> str:
            made.append(server.fresh_database("bench"))
            return made[-1]

        return {**measure(make_url, appends), "server": note}
    finally:
        for url in made:
            server.drop_database(url)
        server.stop()


def print_table(document: dict[str, Any]) -> None:
    print(f"audit store, {document['appends']} appends of ~1 KB entries per figure")
    print(f"{'backend':<12} {'1 writer/s':>11} {'CPU ms/append':>14} {'4 writers/s':>12} {'verify/s':>10}")
    for name, figures in document["backends"].items():
        if "skipped" in figures:
            print(f"{name:<12} skipped: {figures['skipped']}")
            continue
        print(f"{name:<12} {figures['one_writer']['appends_per_s']:>11} {figures['one_writer']['cpu_ms_per_append']:>14}"
              f" {figures['four_writers']['appends_per_s']:>12} {figures['verify']['entries_per_s']:>10}")
    for name, why in document["not_measured"].items():
        print(f"{name}: not measured ({why})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=4000, help="appends per figure (default 4000)")
    parser.add_argument("--quick", action="store_true", help="400 appends per figure")
    parser.add_argument("--postgres-url", help="a PostgreSQL superuser URL to create the bench's databases on")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    document = run(args)
    print_table(document)
    if args.json:
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
