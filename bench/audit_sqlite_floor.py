"""What SQLite itself costs per audit append, and what the schema's parts cost within it.

Each variant is a SQLite file migrated the product's way (WAL,
``synchronous=NORMAL``, :func:`audit.make_engine`, :func:`audit.migrate`),
(or to the earlier revision it names), then changed as its name says (an
index group dropped or made, the guard trigger dropped, another page size
or checkpoint interval), and gets the statements an append runs and nothing
else: ``BEGIN IMMEDIATE``, the head read, the insert of a ~1 KB entry (its
texts and hashes made in advance), commit. Variants run in alternating
rounds in one process, so the machine's noise hits all alike; CPU is
``time.process_time`` (SQLite runs in-process), the best round is reported
with its ratio to the schema as shipped. None of the variants is the
product: they say what each part of the schema costs an append
(docs/architecture.md, "audit: the append path"). Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/audit_sqlite_floor.py [--appends 1000] [--rounds 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/audit_sqlite_floor.py`: import the packages from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audit import make_engine, migrate  # noqa: E402
from audit.chain import canonical_text  # noqa: E402
from audit.tables import audit_table  # noqa: E402
from bench._figures import rounded, write_json  # noqa: E402
from bench.audit import COMPLETION_BODY, COMPLETION_PAYLOAD, REQUEST_BODY, REQUEST_PAYLOAD  # noqa: E402

#: audit_0004's three (column, created_at) indexes, which audit_0005 dropped.
_CREATED_AT_INDEXES = [f"CREATE INDEX ix_audit_entries_{c}_created_at ON audit_entries ({c}, created_at)"
                       for c in ("principal", "team", "model")]
_SEQ_INDEXES = [f"DROP INDEX ix_audit_entries_{c}_seq" for c in ("principal", "team", "model", "kind")]
#: name -> (statements run after migrating, page size, audit schema revision)
VARIANTS: dict[str, tuple[list[str], int, str]] = {
    "as shipped": ([], 4096, "head"),
    "audit_0004 (before audit_0005)": ([], 4096, "audit_0004"),
    "with audit_0004's 3 (x, created_at) indexes": (_CREATED_AT_INDEXES, 4096, "head"),
    "without the no_replace trigger": (["DROP TRIGGER audit_entries_no_replace"], 4096, "head"),
    "without the 4 (x, seq) indexes": (_SEQ_INDEXES, 4096, "head"),
    "wal_autocheckpoint 4000 pages": (["PRAGMA wal_autocheckpoint = 4000"], 4096, "head"),
    "page_size 2048": ([], 2048, "head"),
    "without the 4 (x, seq) indexes, page 2048": (_SEQ_INDEXES, 2048, "head"),
}
_HEAD = "SELECT seq, hash FROM audit_entries ORDER BY seq DESC LIMIT 1"


class Variant:
    """One SQLite file and the append's statements on it."""

    def __init__(self, path: Path, statements: list[str], page_size: int, revision: str = "head") -> None:
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA page_size = {page_size}")  # before the first table: it sets the file's page size
        conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        self._engine = make_engine(f"sqlite:///{path}")
        migrate(self._engine, revision)
        self._proxied = self._engine.raw_connection()  # the product's connect-time settings
        self._conn = self._proxied.dbapi_connection
        for statement in statements:
            self._conn.execute(statement)
        self._cursor = self._conn.cursor()
        self._insert = str(audit_table.insert().compile(dialect=self._engine.dialect))
        self._prev = "0" * 64
        self._count = 0
        self._bodies = (canonical_text(REQUEST_BODY), canonical_text(COMPLETION_BODY))
        self._payloads = tuple(canonical_text({**p, "salt": "0" * 32}) for p in (REQUEST_PAYLOAD, COMPLETION_PAYLOAD))
        self._digests = tuple(hashlib.sha256(p.encode()).hexdigest() for p in self._payloads)
        self.samples: list[float] = []

    def append_round(self, count: int) -> float:
        """``count`` appends (request/completion pairs); returns the CPU seconds they took."""
        cursor, insert = self._cursor, self._insert
        began = time.process_time()
        for _ in range(count):
            i = self._count
            self._count += 1
            cursor.execute("BEGIN IMMEDIATE")
            head = cursor.execute(_HEAD).fetchone()
            seq = head[0] + 1 if head else 1
            k = i % 2
            entry_hash = hashlib.sha256(b"%d" % seq).hexdigest()
            rid = f"r-{i // 2}"
            cursor.execute(insert, (seq, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"), rid,
                                    ("request", "completion")[k], f"p{i % 50}", f"t{i % 7}", f"m{i % 3}",
                                    self._bodies[k], "rev-1", rid if k else None, self._prev, entry_hash,
                                    self._payloads[k], self._digests[k]))
            cursor.execute("COMMIT")
            self._prev = entry_hash
        return time.process_time() - began

    def close(self) -> None:
        self._cursor.close()
        self._proxied.close()
        self._engine.dispose()


def run(appends: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="govgate-bench-floor-") as folder:
        variants = {name: Variant(Path(folder) / f"v{i}.db", statements, page, revision)
                    for i, (name, (statements, page, revision)) in enumerate(VARIANTS.items())}
        try:
            for variant in variants.values():
                variant.append_round(min(appends, 300))  # warm-up: statement cache, page cache
            for r in range(rounds):
                for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                    variants[name].samples.append(variants[name].append_round(appends))
        finally:
            for variant in variants.values():
                variant.close()
    best = {name: min(v.samples) / appends * 1000 for name, v in variants.items()}
    shipped = best["as shipped"]
    return {"appends_per_round": appends, "rounds": rounds,
            "variants": {name: {"cpu_ms_per_append": rounded(ms, 3), "vs_shipped": rounded(ms / shipped, 2)}
                         for name, ms in best.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=1000, help="appends per variant per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args.appends, args.rounds)
    print(f"SQLite's own work per audit append, best of {args.rounds} rounds x {args.appends} appends (CPU)")
    for name, figures in result["variants"].items():
        print(f"{name:<46} {figures['cpu_ms_per_append']:>7} ms  x{figures['vs_shipped']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
