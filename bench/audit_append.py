"""What does one audit append cost, the way the store did it before and the way it does it now?

Each path appends to a SQLite file in WAL mode, opened the way the product
opens it (:func:`audit.make_engine`, :func:`audit.migrate`), with realistic
bodies: a ``request`` entry (prompt, parameters, decision, policy input) and
its ``completion`` entry, alternately.

- **baseline**: the append as it was before the hot path was rewritten,
  kept here inline: the body serialised to canonical JSON and parsed back,
  the locked transaction through a SQLAlchemy ``Connection``, the head read
  with a Core ``select``, the whole entry serialised again for the hash, and
  a Core ``insert`` (which serialises the body a third time). It writes
  chain format 1 (texts in the body), so it has its own file at audit_0001.
- **store**: :meth:`audit.AuditStore.append` as it is now: format 2, the
  texts (messages, output) in the salted payload, its digest chained.
- **store@0004**: the same, on a file migrated only to audit_0004 (the
  schema before audit_0005 made the append leaner): the schema's share.
- **sqlite floor**: the same three statements and commit on one open
  ``sqlite3`` connection to a third file, with a row of the same shape
  (the bodies serialised in advance, hashes and times as scattered as real
  ones, so the indexes see the same kind of inserts): what SQLite itself
  costs, which no Python-side change can remove.

They run in alternating rounds in the same process, so machine noise (other benchmarks on the same cores) hits both
alike; the figure to watch is the ratio. CPU is ``time.process_time``
(this process only: SQLite runs in-process, so its work is included, the
disk's waiting is not); appends/s is wall-clock. ``terminal_for`` is
measured the same way against the SQLAlchemy Core select it used to be. At
the end the store's chain is verified and the verdict printed.

Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/audit_append.py [--appends 2000] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

if not __package__:  # run as `python bench/audit_append.py`: import the packages from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sqlalchemy import select  # noqa: E402

from audit import AuditEntry, AuditStore, make_engine, migrate, verify_chain  # noqa: E402
from audit.chain import GENESIS_HASH, canonical_text, chain_hash, format_timestamp  # noqa: E402
from audit.db import APPEND_LOCK_KEY, locked_transaction  # noqa: E402
from audit.kinds import TERMINAL_KINDS  # noqa: E402
from audit.entry_args import check_args  # noqa: E402
from audit.tables import audit_table  # noqa: E402
from bench._figures import ratio, rounded, write_json  # noqa: E402

_t = audit_table.c

#: The keys whose texts format 2 keeps in the erasable payload rather than in the chained body.
TEXT_KEYS = ("messages", "prompt", "output")


def split_texts(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``body`` without its texts, and the texts as the payload (None when it has none)."""
    payload = {k: body[k] for k in TEXT_KEYS if k in body}
    return {k: v for k, v in body.items() if k not in TEXT_KEYS}, payload or None


#: A request entry as the gateway writes it (gateway/requests/audit_records.py), prompt logged in full.
REQUEST_BODY: dict[str, Any] = {
    "endpoint": "/v1/chat/completions",
    "key_id": "key_7f3a91c2",
    "roles": ["analyst", "user"],
    "purpose": None,
    "stream": False,
    "params": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256, "stop": ["\n\n"], "seed": None},
    "requested_max_tokens": 256,
    "decision": {"allow": True, "reasons": [],
                 "obligations": {"max_tokens": 256, "prompt_logging": "full", "priority": 5}},
    "admission": {"queue": "tiny", "depth": 3, "reserved_tokens": 512},
    "policy_input": {
        "principal": {"id": "alice", "team": "blue", "roles": ["analyst", "user"]},
        "model": "tiny",
        "usage": {"principal": {"requests_per_minute": 3, "tokens_per_minute": 900},
                  "team": {"requests_per_minute": 12, "tokens_per_minute": 4000}},
    },
    "prompt_logging": "full",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise the quarterly report for the board in three bullet points, "
                                    "naming the revenue, the costs and the outlook for the next quarter. " * 3},
    ],
}
#: Its terminal entry as a worker writes it.
COMPLETION_BODY: dict[str, Any] = {
    "text": "- Revenue rose 12 % on the quarter.\n- Costs were flat.\n- The outlook is cautious. " * 2,
    "finish_reason": "stop",
    "prompt_tokens": 97,
    "completion_tokens": 61,
    "worker": "celery@host-1",
    "duration_ms": 812.5,
}

#: Format 2: the texts go to the erasable payload, the rest stays in the chained body.
SPLIT: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "request": split_texts(REQUEST_BODY), "completion": split_texts(COMPLETION_BODY)}

def _old_canonical_json(value: Any) -> bytes:
    """``audit.chain.canonical_json`` as it was: ``json.dumps`` with its keywords, a new encoder per call."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


Append = Callable[[AuditStore, str, str, Mapping[str, Any]], Any]


def baseline_append(store: AuditStore, kind: str, request_id: str, body: Mapping[str, Any]) -> AuditEntry:
    """The append as the store did it before: SQLAlchemy Core on a Connection, the body serialised three times."""
    check_args(kind, request_id, principal="alice", team="blue", model="tiny", policy_revision="rev-1")
    stored_body = json.loads(_old_canonical_json(dict(body)))
    terminal_request_id = request_id if kind in TERMINAL_KINDS else None
    with locked_transaction(store.engine, APPEND_LOCK_KEY) as conn:
        head = conn.execute(select(_t.seq, _t.hash).order_by(_t.seq.desc()).limit(1)).first()
        fields: dict[str, Any] = {
            "seq": head.seq + 1 if head else 1,
            "created_at": datetime.now(timezone.utc),
            "request_id": request_id,
            "kind": kind,
            "principal": "alice",
            "team": "blue",
            "model": "tiny",
            "body": stored_body,
            "policy_revision": "rev-1",
            "terminal_request_id": terminal_request_id,
            "prev_hash": head.hash if head else GENESIS_HASH,
        }
        payload = _old_canonical_json({**fields, "created_at": format_timestamp(fields["created_at"])})
        fields["hash"] = chain_hash(fields["prev_hash"], payload)
        conn.execute(audit_table.insert(), fields)
    return AuditEntry(**fields)


def store_append(store: AuditStore, kind: str, request_id: str, body: Mapping[str, Any]) -> AuditEntry:
    metadata, payload = SPLIT[kind]
    return store.append(kind, request_id, principal="alice", team="blue", model="tiny", body=metadata,
                        policy_revision="rev-1", payload=payload)


def baseline_terminal_for(store: AuditStore, request_id: str) -> AuditEntry | None:
    """``terminal_for`` as it was: a Core select built per call, rows as mappings."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(audit_table).where(_t.terminal_request_id == request_id)).mappings().all()
    return AuditEntry.from_row(rows[0]) if rows else None


def store_terminal_for(store: AuditStore, request_id: str) -> AuditEntry | None:
    return store.terminal_for(request_id)


class SqliteFloor:
    """The statements an append runs, with nothing computed per entry: SQLite's own share of an append."""

    def __init__(self, engine_url: str) -> None:
        engine = make_engine(engine_url)
        migrate(engine)
        self._engine = engine
        self._conn = engine.raw_connection()  # connect-time settings of the product (WAL, busy_timeout)
        self._bodies = {kind: canonical_text(metadata) for kind, (metadata, _) in SPLIT.items()}
        self._payloads = {kind: canonical_text({**(payload or {}), "salt": "0" * 32}) for kind, (_, payload) in SPLIT.items()}
        self._digests = {kind: hashlib.sha256(text.encode()).hexdigest() for kind, text in self._payloads.items()}
        self._insert = str(audit_table.insert().compile(dialect=engine.dialect))

    def append(self, _store: AuditStore, kind: str, request_id: str, _body: Mapping[str, Any]) -> None:
        cursor = self._conn.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        head = cursor.execute("SELECT seq FROM audit_entries ORDER BY seq DESC LIMIT 1").fetchone()
        seq = head[0] + 1 if head else 1
        terminal = request_id if kind in TERMINAL_KINDS else None
        created_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        prev_hash, entry_hash = (hashlib.sha256(b"%d" % n).hexdigest() for n in (seq, seq + 1))
        cursor.execute(self._insert, (seq, created_at, request_id, kind, "alice", "blue", "tiny",
                                      self._bodies[kind], "rev-1", terminal, prev_hash, entry_hash,
                                      self._payloads[kind], self._digests[kind]))
        cursor.close()
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()
        self._engine.dispose()


def timed(work: Callable[[int], Any], count: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``work(i)`` for i in range(count)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        work(i)
    return time.process_time() - cpu, time.perf_counter() - wall


def append_round(store: AuditStore, append: Append, tag: str, count: int) -> tuple[float, float]:
    """``count`` appends: request and completion entries of ``count // 2`` requests, alternately."""
    def one(i: int) -> None:
        rid = f"{tag}-{i // 2}"
        if i % 2 == 0:
            append(store, "request", rid, REQUEST_BODY)
        else:
            append(store, "completion", rid, COMPLETION_BODY)
    return timed(one, count)


def figures(samples: list[tuple[float, float]], count: int) -> dict[str, float | None]:
    """Median over rounds: CPU ms per operation and operations per second."""
    cpu = statistics.median(s[0] for s in samples) / count
    wall = statistics.median(s[1] for s in samples) / count
    return {"cpu_ms": rounded(cpu * 1000, 3), "per_s": rounded(1 / wall if wall else None, 0)}


def run(appends: int, rounds: int, lookups: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="govgate-bench-audit-") as folder:
        engine = make_engine(f"sqlite:///{folder}/audit.db")
        migrate(engine)
        store = AuditStore(engine)
        # The baseline writes format-1 entries, which cannot share a format-2 chain: its own file, at the
        # schema it was written for.
        baseline_engine = make_engine(f"sqlite:///{folder}/baseline.db")
        migrate(baseline_engine, "audit_0001")
        baseline_store = AuditStore(baseline_engine)
        # The same store code on the schema before audit_0005 (unique prev_hash, full unique terminal index,
        # three (x, created_at) indexes, the two-statement guard): what the schema change alone is worth.
        before_engine = make_engine(f"sqlite:///{folder}/audit_0004.db")
        migrate(before_engine, "audit_0004")
        before_store = AuditStore(before_engine)
        floor = SqliteFloor(f"sqlite:///{folder}/floor.db")
        paths: dict[str, Append] = {
            "baseline": lambda _store, kind, rid, body: baseline_append(baseline_store, kind, rid, body),
            "store@0004": lambda _store, kind, rid, body: store_append(before_store, kind, rid, body),
            "store": store_append, "sqlite floor": floor.append}
        for name, append in paths.items():  # warm-up: connections, compiled statements, page cache
            append_round(store, append, f"warm-{name}", 200)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                samples[name].append(append_round(store, paths[name], f"{name}-{r}", appends))
        floor.close()
        finished = [f"store-{r}-{i}" for r in range(rounds) for i in range(appends // 2)]
        lookup_paths = {"baseline": baseline_terminal_for, "store": store_terminal_for}
        lookup_samples: dict[str, list[tuple[float, float]]] = {name: [] for name in lookup_paths}
        for r in range(rounds):
            for name, lookup in lookup_paths.items():
                lookup_samples[name].append(
                    timed(lambda i, f=lookup: f(store, finished[i % len(finished)]), lookups))
        verdict = verify_chain(store)
        engine.dispose()
        baseline_engine.dispose()
        before_engine.dispose()
    append_figures = {name: figures(s, appends) for name, s in samples.items()}
    lookup_figures = {name: figures(s, lookups) for name, s in lookup_samples.items()}
    return {
        "appends_per_round": appends,
        "rounds": rounds,
        "append": append_figures,
        "append_cpu_ratio": ratio(append_figures["baseline"]["cpu_ms"], append_figures["store"]["cpu_ms"]),
        "append_cpu_ratio_0004": ratio(append_figures["store@0004"]["cpu_ms"], append_figures["store"]["cpu_ms"]),
        "append_cpu_above_floor_ms": rounded(
            (append_figures["store"]["cpu_ms"] or 0) - (append_figures["sqlite floor"]["cpu_ms"] or 0), 3),
        "terminal_for_per_round": lookups,
        "terminal_for": lookup_figures,
        "terminal_for_cpu_ratio": ratio(lookup_figures["baseline"]["cpu_ms"], lookup_figures["store"]["cpu_ms"]),
        "chain": {"ok": verdict.ok, "checked": verdict.checked, "problem": verdict.problem},
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"audit append, SQLite WAL file, {result['rounds']} rounds x {result['appends_per_round']} appends "
          "(median round)")
    print(f"{'path':<14}{'CPU ms/append':>16}{'appends/s':>12}")
    for name, fig in result["append"].items():
        print(f"{name:<14}{fig['cpu_ms']:>16}{fig['per_s']:>12}")
    print(f"CPU ratio baseline/store: {result['append_cpu_ratio']}")
    print(f"CPU ratio store@0004/store (the schema before audit_0005): {result['append_cpu_ratio_0004']}")
    print(f"store above the sqlite floor: {result['append_cpu_above_floor_ms']} ms CPU per append")
    print(f"\nterminal_for, {result['rounds']} rounds x {result['terminal_for_per_round']} look-ups")
    print(f"{'path':<14}{'CPU ms/call':>16}{'calls/s':>12}")
    for name, fig in result["terminal_for"].items():
        print(f"{name:<14}{fig['cpu_ms']:>16}{fig['per_s']:>12}")
    print(f"CPU ratio baseline/store: {result['terminal_for_cpu_ratio']}")
    chain = result["chain"]
    print(f"\nchain written by the store: {'verifies' if chain['ok'] else 'DOES NOT VERIFY: ' + str(chain['problem'])}"
          f" ({chain['checked']} entries)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=2000, help="appends per path per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--lookups", type=int, default=2000, help="terminal_for calls per path per round")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args.appends, args.rounds, args.lookups)
    print_report(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
