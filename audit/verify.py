"""Recompute the hash chain and report the first entry that does not fit.

Read-only and streaming, apart from the store so a reviewer can verify
without write access. The checks themselves (each format on its range, the
stored body hashed byte for byte, payload digests, links, seq continuity)
are :mod:`audit.verify_walk`'s; this module splits the chain into seq
ranges walked by worker processes at once and stitches their findings
together, so that the result is the serial walk's to the letter: the same
first bad entry, problem, ``checked`` count and head. What each check
catches, what it cannot (a cut-off tail, without a checkpoint), and why
verify is fast: docs/architecture.md, "Audit entries and the chain".
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, func, select

from . import stall_watch
from .chain import GENESIS_HASH
from .db import DB_ERRORS, describe, make_engine, reason
from .dbapi import dbapi_cursor
from .errors import AuditError
from .kinds import CHAIN_FORMAT
from .store import AuditStore
from .tables import audit_table
from .verify_walk import RangeResult, Statements, gap_problem, link_problem, walk_range

_t = audit_table.c
#: Fewer entries than this per worker and a worker costs more than it saves (measured: see the docs).
MIN_ENTRIES_PER_WORKER: Final = 20_000
#: SQLite reads the file through a memory map of up to this size while verifying (its build caps it,
#: 2 GiB by default): a page read is then a memory access, not a read() system call and a copy.
SQLITE_MMAP_BYTES: Final = 1 << 40
#: How long to wait for a worker to go after its result is in (or after it was told to stop).
_JOIN_TIMEOUT_S: Final = 30.0
_NONE_BAD: Final = 2**62
#: Rows per read: a batch of about 1.3 MB of row objects stays in a core's cache while it is checked
#: (measured: 1,000 rows took less CPU an entry than 5,000; see the docs).
BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`.

    ``checked`` counts entries found sound before the first bad one (all of
    them when ``ok``). ``head_seq`` and ``head_hash`` are those of the last
    sound entry, what a checkpoint would sign. ``format_boundary`` is the
    seq of the ``chain_format`` entry when one was reached.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: str | None
    head_hash: str | None = None
    head_seq: int | None = None
    format_boundary: int | None = None


def verify_chain(source: AuditStore | Engine, *, batch: int = BATCH, workers: int | None = None) -> VerifyResult:
    """Check every entry in seq order; report the first problem.

    ``workers``: how many processes walk the chain at once (this one
    included); None or 1 walks it here alone. Fewer are used on a short
    chain (:data:`MIN_ENTRIES_PER_WORKER`) and on an in-memory database.
    Workers open their own connections from the engine's URL. The result
    does not depend on ``workers`` or ``batch``.

    Raises :class:`audit.AuditError` if the database cannot be read at all
    (that is not a verdict on the chain).
    """
    if batch <= 0:
        raise ValueError("batch must be positive")
    if workers is not None and workers <= 0:
        raise ValueError("workers must be positive")
    engine = source.engine if isinstance(source, AuditStore) else source
    try:
        below = _lowest_below_one(engine)
        if below is not None:  # rows the walk (seq > 0) would never read, but every reader shows
            return VerifyResult(ok=False, checked=0, first_bad_seq=below,
                                problem=f"entry {below} has a seq below 1: it is outside the chain, which starts at "
                                        "entry 1 (a row inserted around the store)")
        statements = Statements(engine)
        ranges, boundary = _plan(engine, workers or 1)
        if len(ranges) == 1:
            results = [walk_range(engine, 0, None, None, batch=batch, statements=statements,
                                  mmap_bytes=SQLITE_MMAP_BYTES)]
        else:
            results = _in_parallel(engine, statements, ranges, boundary, batch)
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc
    return stitch(results)


def stitch(results: list[RangeResult]) -> VerifyResult:
    """The serial walk's result from consecutive ranges' results (the lowest bad entry wins).

    Each range's first row is held against the last entry of the ranges
    before it, exactly as the serial walk holds every row against the one
    before: a seq gap or a broken link at a range edge is reported there.
    """
    checked, head_seq, head_hash, boundary = 0, None, None, None
    expected_seq, expected_prev = 1, GENESIS_HASH
    for result in results:
        if result.cancelled:  # only after a lower bad entry, which ends the loop first
            raise AuditError("verify: a range was cancelled although no entry below it is bad")
        if result.first_seq is None:
            continue  # no entry in this range
        problem = None
        if result.first_seq != expected_seq:
            problem = gap_problem(expected_seq, result.first_seq)
        elif result.first_prev != expected_prev:
            problem = link_problem(result.first_seq)
        if problem is not None:
            return VerifyResult(ok=False, checked=checked, first_bad_seq=result.first_seq, problem=problem,
                                head_hash=head_hash, head_seq=head_seq, format_boundary=boundary)
        checked += result.checked
        boundary = result.boundary
        if result.head_seq is not None:
            head_seq, head_hash = result.head_seq, result.head_hash
        if result.bad_seq is not None:
            return VerifyResult(ok=False, checked=checked, first_bad_seq=result.bad_seq, problem=result.problem,
                                head_hash=head_hash, head_seq=head_seq, format_boundary=boundary)
        expected_seq, expected_prev = (head_seq or 0) + 1, head_hash
    return VerifyResult(ok=True, checked=checked, first_bad_seq=None, problem=None,
                        head_hash=head_hash, head_seq=head_seq, format_boundary=boundary)


def _lowest_below_one(engine: Engine) -> int | None:
    """The lowest seq below 1, if a row has one (the walks read ``seq > 0`` only)."""
    with dbapi_cursor(engine) as cursor:
        cursor.execute(str(select(func.min(_t.seq)).where(_t.seq < 1).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True})))
        (lowest,) = cursor.fetchone()
    return None if lowest is None else int(lowest)


def _plan(engine: Engine, workers: int) -> tuple[list[tuple[int, int | None]], int | None]:
    """Seq ranges ``(after, upto]`` for the workers (the last open-ended) and the format boundary's seq.

    The boundary is the lowest ``chain_format`` entry (the ``kind`` index):
    the serial walk takes the first one it meets as the boundary or stops
    there, so a range starting above it is format 2 if everything below is
    sound, and nothing above matters otherwise.
    """
    if workers == 1 or engine.url.get_backend_name() == "sqlite" and engine.url.database in (None, "", ":memory:"):
        return [(0, None)], None
    with dbapi_cursor(engine) as cursor:
        cursor.execute(str(select(func.max(_t.seq)).compile(dialect=engine.dialect)))
        (head,) = cursor.fetchone()
        boundary_sql = select(func.min(_t.seq)).where(_t.kind == CHAIN_FORMAT)
        cursor.execute(str(boundary_sql.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})))
        (boundary,) = cursor.fetchone()
    workers = min(workers, int(head or 0) // MIN_ENTRIES_PER_WORKER)
    if workers <= 1:
        return [(0, None)], None
    edges = [head * k // workers for k in range(workers)]
    return [(edges[k], edges[k + 1] if k + 1 < workers else None) for k in range(workers)], boundary


def _in_parallel(engine: Engine, statements: Statements, ranges: list[tuple[int, int | None]],
                 boundary: int | None, batch: int) -> list[RangeResult]:
    """Walk ``ranges[0]`` here and the others in child processes; their results in range order.

    Children are forked when this process runs no other thread but the
    stall watch's (:func:`audit.stall_watch.fork_is_safe`; a fork copies the
    imported modules: a spawned interpreter spends about 0.7 s of CPU
    importing SQLAlchemy first), spawned otherwise (a forked child can hang
    on a lock another thread held). This engine's pooled connections
    are closed first, so no child inherits SQLite's per-process lock state
    for them. A child that finds a bad entry lowers ``lowest``; ranges above
    it stop at their next batch.
    """
    fork = stall_watch.fork_is_safe() and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    engine.dispose()
    lowest = context.Value("q", _NONE_BAD)
    url = engine.url.render_as_string(hide_password=False)
    children: list[tuple[Any, Any]] = []
    try:
        for after, upto in ranges[1:]:
            receive, send = context.Pipe(duplex=False)
            in_force = boundary if boundary is not None and boundary <= after else None
            child = context.Process(target=_child, args=(send, url, after, upto, in_force, batch, lowest),
                                    name=f"govgate-verify-{after}", daemon=True)
            child.start()
            send.close()
            children.append((child, receive))
        first = walk_range(engine, 0, ranges[0][1], None, batch=batch, statements=statements,
                           mmap_bytes=SQLITE_MMAP_BYTES)
        if first.bad_seq is not None:
            _lower(lowest, first.bad_seq)
        results = [first]
        if first.bad_seq is None:
            for child, receive in children:
                results.append(_receive(child, receive))
                if results[-1].bad_seq is not None:
                    break  # the ranges above cannot matter
        return results
    finally:
        _lower(lowest, 0)  # whatever still runs stops at its next batch
        for child, receive in children:
            receive.close()
            child.join(_JOIN_TIMEOUT_S)
            if child.is_alive():
                child.kill()
                child.join()


def _receive(child: Any, receive: Any) -> RangeResult:
    try:
        message = receive.recv()
    except EOFError:
        child.join(_JOIN_TIMEOUT_S)
        raise AuditError(f"a verify worker ended without a result (exit code {child.exitcode})") from None
    if isinstance(message, str):
        raise AuditError(f"a verify worker could not read the audit store: {message}")
    return message


def _lower(lowest: Any, seq: int) -> None:
    with lowest.get_lock():
        if seq < lowest.value:
            lowest.value = seq


def _child(send: Any, url: str, after: int, upto: int | None, boundary: int | None, batch: int,
           lowest: Any) -> None:
    """A worker process: walk one range on its own connection and send the result (or why it could not)."""
    engine = None
    try:
        engine = make_engine(url)
        result = walk_range(engine, after, upto, boundary, batch=batch, stop_below=lambda: lowest.value,
                            mmap_bytes=SQLITE_MMAP_BYTES)
        if result.bad_seq is not None:
            _lower(lowest, result.bad_seq)
        send.send(result)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises AuditError
        send.send(reason(exc) if isinstance(exc, DB_ERRORS) else f"{type(exc).__name__}: {exc}")
    finally:
        if engine is not None:
            engine.dispose()
        send.close()
