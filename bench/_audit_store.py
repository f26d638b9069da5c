"""A large, realistic, correctly chained SQLite audit store for the read benches, built fast and cached.

Appending a million entries through :class:`audit.AuditStore` takes a
quarter of an hour (one transaction per append); the read figures need the
store, not the appends. So the rows are made here with the very functions
the append path uses (:func:`audit.chain.canonical_text`,
:func:`audit.chain.entry_payload_with_body`, :func:`audit.chain.chain_hash`,
the columns' own bind processors) and inserted with ``executemany`` in big
transactions, into a store migrated the product's way: the hashes are the
ones ``AuditStore`` would have written, and :func:`audit.verify_chain`
passes (tests/bench/test_audit_bench.py checks both on a small store).

The content imitates thirty days of a gateway: request/completion pairs of
a few hundred principals in a dozen teams on five models, with the odd
entry of another request in between; about 8 % denied with reason codes
(these never end), a few failures, time-outs and rejections, and review
entries (flags, comments, dispositions, payload reads). An entry is about
1 KB: metadata in the chained body, the prompt or output in the salted
payload, as the gateway writes them. A fixed seed makes the same store.

The file is cached under ``var/bench/`` keyed by :data:`FORMAT`, the schema's
head revision and the entry count: a rerun reuses it, a schema change (a
new migration) or a change to this generator (bump :data:`FORMAT`) makes it
again. It is built under a temporary name and renamed when complete, so an
interrupted build is never reused.
"""

from __future__ import annotations

import random
import sqlite3
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Final, Iterator

from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from audit import make_engine, migrate
from audit.chain import FORMAT_1, FORMAT_2, GENESIS_HASH, canonical_text, chain_hash, entry_payload_with_body
from audit.chain import payload_digest
from audit.db import alembic_config
from audit.kinds import (CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID, COMMENTED, COMPLETION, DISPOSITIONED, FAILED,
                         FLAGGED, PAYLOAD_READ, REJECTED, REQUEST, TIMED_OUT)
from audit.tables import audit_table

#: Bump when the generated content changes: cached stores of another format are made again.
FORMAT: Final = "audit-bench-store-1"
ROOT: Final = Path(__file__).resolve().parent.parent
CACHE_DIR: Final = ROOT / "var" / "bench"

START: Final = datetime(2026, 10, 1, tzinfo=timezone.utc)
DAYS: Final = 30
TEAMS: Final = tuple(f"team-{name}" for name in ("blue", "red", "green", "gold", "grey", "teal", "plum", "rust",
                                                 "sand", "navy", "lime", "rose"))
PRINCIPALS: Final = tuple(f"svc-{i:03d}" for i in range(240))
MODELS: Final = ("llama-3.1-8b", "mistral-7b", "qwen2.5-14b", "phi-3-mini", "gemma-2-9b")
REASONS: Final = ("model_not_allowed", "quota_exceeded", "outside_hours", "prompt_too_long", "role_missing",
                  "pii_detected")
REVIEWERS: Final = ("rev-anna", "rev-omar", "rev-li")
#: Rows per executemany and per transaction.
BATCH: Final = 20_000

_TOPICS: Final = ("the quarterly report", "the incident post-mortem", "the supplier contract", "the release notes",
                  "the hiring plan", "the customer complaint", "the security review", "the migration runbook")
_SYSTEM: Final = ("You are a helpful assistant for the staff of ACME Ltd. Answer in British English, be brief and "
                  "factual, say when you do not know, never invent figures, and never repeat personal data "
                  "(names, addresses, account numbers) from the documents you are given.")
_ASKS: Final = ("Summarise {t} for the board in three bullet points, naming the figures that matter and the "
                "risks for the next quarter; keep it under a hundred words and plain.",
                "Draft a polite reply about {t}: thank them, say what we will do by Friday, and offer a call. "
                "Our tone is friendly and short; no promises we cannot keep.",
                "List the open questions in {t} as a numbered list, each with the owner who should answer it, "
                "and mark the two that block the next step.")


@dataclass(frozen=True)
class Store:
    """A built store: its SQLAlchemy URL, file, entry count and what the bench queries it with."""

    url: str
    path: Path
    entries: int
    built_s: float | None  # None when reused from the cache
    sample_request_ids: tuple[str, ...]


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or "none"


def cached_path(entries: int) -> Path:
    return CACHE_DIR / f"audit-store-{FORMAT}-{head_revision()}-{entries}.db"


def sample_request_ids(count: int, *, seed: int = 7) -> tuple[str, ...]:
    """Request ids that exist in a store of ``count`` entries (the story's subjects)."""
    rng = random.Random(seed)
    top = max(1, int(count * 0.4))
    return tuple(_request_id(rng.randrange(top)) for _ in range(50))


def open_store(entries: int, *, folder: Path | None = None, log: Callable[[str], None] = print) -> Store:
    """The cached store of ``entries`` entries, built first if missing (``folder`` overrides the cache)."""
    path = (folder / cached_path(entries).name) if folder is not None else cached_path(entries)
    built_s = None
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder is None:
            for stale in path.parent.glob("audit-store-*.db*"):
                if not stale.name.startswith(f"audit-store-{FORMAT}-{head_revision()}-"):
                    stale.unlink()  # another format or schema: it would never be used again
        log(f"building a store of {entries:,} audit entries in {path} (cached for later runs)")
        built_s = build(path, entries)
    return Store(f"sqlite:///{path}", path, entries, built_s, sample_request_ids(entries))


def build(path: Path, entries: int) -> float:
    """Write a store of exactly ``entries`` entries to ``path``; returns the seconds it took."""
    import time

    began = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    for leftover in (partial, partial.with_name(partial.name + "-wal"), partial.with_name(partial.name + "-shm")):
        leftover.unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{partial}")
    migrate(engine)
    insert = _Insert(engine)
    engine.dispose()
    conn = sqlite3.connect(partial, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # a bench fixture: a crash just means building it again
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: the indexes stay in memory while they grow
        rows: list[Any] = []
        for row in insert.rows(generate(entries)):
            rows.append(row)
            if len(rows) >= BATCH:
                _insert_batch(conn, insert.sql, rows)
                rows = []
        if rows:
            _insert_batch(conn, insert.sql, rows)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    partial.replace(path)
    return time.perf_counter() - began


def _insert_batch(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> None:
    conn.execute("BEGIN")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")


class _Insert:
    """The insert as the append compiles it, and rows chained and bound as the append binds them."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        compiled = audit_table.insert().compile(dialect=dialect)
        self.sql = str(compiled)
        self.names = tuple(compiled.positiontup or ())
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for column in audit_table.columns:
            if column.name in ("body", "payload"):
                continue  # bound as their canonical text, as the append binds them
            processor = column.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[column.name] = processor

    def rows(self, entries: Iterator[tuple[dict[str, Any], str, str | None]]) -> Iterator[list[Any]]:
        """Chain ``(fields, body_text, payload_text)`` in order: seq 1 is the format boundary, as on a new store."""
        prev_hash = GENESIS_HASH
        for seq, (fields, body_text, payload_text) in enumerate(entries, start=1):
            format_ = FORMAT_1 if fields["kind"] == CHAIN_FORMAT else FORMAT_2
            digest = None if payload_text is None else payload_digest(payload_text.encode("utf-8"))
            row = {**fields, "seq": seq, "prev_hash": prev_hash}
            if format_ == FORMAT_2:
                row["payload_digest"] = digest
            entry_hash = chain_hash(prev_hash, entry_payload_with_body(row, body_text, format=format_))
            row.update(hash=entry_hash, body=body_text, payload=payload_text, payload_digest=digest)
            for name, processor in self.processors.items():
                row[name] = processor(row[name])
            yield [row[name] for name in self.names]
            prev_hash = entry_hash


def _request_id(n: int) -> str:
    return f"req-{n:08d}"


def generate(entries: int, *, seed: int = 1) -> Iterator[tuple[dict[str, Any], str, str | None]]:
    """``entries`` entries as ``(fields, body_text, payload_text)`` over :data:`DAYS` days, oldest first."""
    rng = random.Random(seed)
    step = timedelta(days=DAYS) / max(entries, 1)
    boundary = {"request_id": CHAIN_FORMAT_REQUEST_ID, "kind": CHAIN_FORMAT, "principal": None, "team": None,
                "model": None, "policy_revision": None, "terminal_request_id": None}
    yield {**boundary, "created_at": START}, canonical_text({"format": FORMAT_2}), None
    made = 1
    pending: list[tuple[str, str, str, str]] = []  # requests allowed and not yet ended
    ended: list[str] = []  # request ids a reviewer may look at
    n = 0
    team_of = {p: TEAMS[i % len(TEAMS)] for i, p in enumerate(PRINCIPALS)}
    while made < entries:
        moment = START + step * made
        roll = rng.random()
        if pending and (len(pending) > 3 or roll < 0.45):  # a completion (or a failure) of an earlier request
            rid, principal, team, model = pending.pop(rng.randrange(len(pending)))
            fields, body = _terminal(rng, rid, principal, team, model)
            payload = ({"output": _output(rng, rid)} if fields["kind"] == COMPLETION else None)
            ended.append(rid)
        elif roll < 0.004 and ended:  # a review action or a payload read
            fields, body = _review(rng, ended)
            payload = None
        else:
            rid = _request_id(n)
            n += 1
            principal = PRINCIPALS[min(int(rng.paretovariate(1.2)) - 1, len(PRINCIPALS) - 1)
                                   if rng.random() < 0.5 else rng.randrange(len(PRINCIPALS))]
            team, model = team_of[principal], MODELS[int(rng.triangular(0, len(MODELS), 0))]
            fields, body, payload = _request(rng, rid, principal, team, model)
            if fields["kind"] == REQUEST and body["decision"]["allow"]:
                pending.append((rid, principal, team, model))
        fields["created_at"] = moment
        fields.setdefault("terminal_request_id", None)
        payload_text = None if payload is None else canonical_text({**payload, "salt": "%032x" % rng.getrandbits(128)})
        yield fields, canonical_text(body), payload_text
        made += 1


def _request(rng: random.Random, rid: str, principal: str, team: str,
             model: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    fields = {"request_id": rid, "principal": principal, "team": team, "model": model,
              "policy_revision": f"rev-{rng.randrange(3, 6)}"}
    key = f"key_{zlib.crc32(principal.encode()):08x}"
    if rng.random() < 0.005:
        return ({**fields, "kind": REJECTED, "policy_revision": None},
                {"endpoint": "/v1/chat/completions", "key_id": key, "error": "invalid_request",
                 "detail": "messages must be a non-empty list"}, None)
    deny = rng.random() < 0.08
    reasons = [{"code": rng.choice(REASONS), "message": "refused by policy"}] if deny else []
    if deny and rng.random() < 0.2:
        reasons.append({"code": rng.choice(REASONS), "message": "refused by policy"})
    max_tokens = rng.choice((128, 256, 512, 1024))
    body = {"endpoint": "/v1/chat/completions", "key_id": key, "roles": ["analyst"], "stream": rng.random() < 0.3,
            "params": {"temperature": round(rng.uniform(0, 1), 2), "top_p": 0.95, "max_tokens": max_tokens,
                       "stop": ["\n\n"], "seed": None},
            "decision": {"allow": not deny, "reasons": reasons,
                         "obligations": {} if deny else {"max_tokens": max_tokens, "prompt_logging": "full"}},
            "admission": None if deny else {"queue": model, "depth": rng.randrange(8), "reserved_tokens": 2 * max_tokens},
            "prompt_logging": "full"}
    topic = rng.choice(_TOPICS)
    payload = {"messages": [{"role": "system", "content": _SYSTEM},
                            {"role": "user", "content": rng.choice(_ASKS).format(t=topic) + f" (ticket {rid[4:]})"}]}
    return {**fields, "kind": REQUEST}, body, payload


def _terminal(rng: random.Random, rid: str, principal: str, team: str,
              model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    roll = rng.random()
    kind = FAILED if roll < 0.01 else TIMED_OUT if roll < 0.015 else COMPLETION
    prompt_tokens, completion_tokens = rng.randrange(40, 400), rng.randrange(10, 600)
    body: dict[str, Any] = {"worker": f"celery@gpu-{rng.randrange(4)}", "duration_ms": round(rng.uniform(80, 9000), 1),
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}}
    if kind == COMPLETION:
        body["finish_reason"] = rng.choice(("stop", "stop", "stop", "length"))
    else:
        body["error"] = "worker_lost" if kind == FAILED else "deadline_exceeded"
    return ({"request_id": rid, "kind": kind, "principal": principal, "team": team, "model": model,
             "policy_revision": None, "terminal_request_id": rid}, body)


def _review(rng: random.Random, ended: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    reviewer = rng.choice(REVIEWERS)
    key = {"key_id": f"key_{zlib.crc32(reviewer.encode()):08x}", "roles": ["reviewer"]}
    target = ended[rng.randrange(max(0, len(ended) - 5000), len(ended))]
    kind = rng.choice((FLAGGED, COMMENTED, DISPOSITIONED, PAYLOAD_READ))
    fields = {"principal": reviewer, "team": "team-audit", "model": None, "policy_revision": None, "kind": kind}
    if kind == PAYLOAD_READ:
        return ({**fields, "request_id": f"read-{rng.getrandbits(48):012x}"},
                {**key, "via": "story", "request_ids": [target], "text_search": False})
    extra = {FLAGGED: {"reason": "possible personal data"}, COMMENTED: {"comment": "checked with the team lead"},
             DISPOSITIONED: {"disposition": rng.choice(("acceptable", "violation"))}}[kind]
    return {**fields, "request_id": target}, {**key, "target": {"seq": None}, **extra}


def _output(rng: random.Random, rid: str) -> str:
    lines = [f"- Point {i + 1}: " + rng.choice(("Revenue rose 12 % on the quarter, led by services.",
                                                "Costs were flat; hiring is paused until March.",
                                                "The outlook is cautious: two contracts renew in Q1.",
                                                "We will send the corrected figures by Friday.",
                                                "The owner of item 3 is the platform team."))
             for i in range(rng.randrange(4, 9))]
    return "\n".join(lines) + f"\n(ref {rid[4:]})"
