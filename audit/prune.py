"""Erase the payloads (prompts, outputs) of entries older than a date; the chain keeps verifying.

Format 2 chains a payload's digest, never the payload, so ``payload -> NULL``
changes nothing the chain covers; it is the one UPDATE the schema's guard
allows (audit_0002). Entries of format 1 (up to the ``chain_format``
boundary) keep their texts inside the hashed body: erasing those would break
their hashes, so they are counted and left alone. The erasure itself is
recorded on the chain as a ``payloads_erased`` entry.

On SQLite the erasing connection turns on ``secure_delete`` (freed bytes are
overwritten with zeros) and the WAL is checkpointed and truncated afterwards,
so the old page images do not linger in the ``-wal`` file. PostgreSQL keeps
old row versions until VACUUM, which prune runs on the table afterwards.

An operator's command whose scans of the whole table and ``VACUUM`` may
take the server minutes to answer: its round trips are
:func:`audit.stall_watch.patient` (never cut as a server that stopped
answering; Ctrl-C ends it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import func, null, or_, select, update

from . import stall_watch
from .chain import format_timestamp
from .db import DB_ERRORS, describe, locked_transaction, reason
from .entry import AuditEntry
from .errors import AuditError
from .kinds import PAYLOADS_ERASED
from .store import AuditStore
from .tables import audit_table

_t = audit_table.c


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :func:`prune_payloads` did.

    ``erased`` payloads, of entries ``first_seq..last_seq`` (not every seq in
    between had one); ``skipped_format_1`` entries created before the date
    are of chain format 1 and keep whatever text their body holds; ``entry``
    is the ``payloads_erased`` entry (None when nothing was erased).
    ``warning`` says what was done but did not fully succeed afterwards
    (PostgreSQL's VACUUM, SQLite's WAL truncation).
    """

    before: datetime
    erased: int
    first_seq: int | None
    last_seq: int | None
    skipped_format_1: int
    entry: AuditEntry | None
    warning: str | None = None


@stall_watch.patient()
def prune_payloads(store: AuditStore, before: datetime, *, batch: int = 500,
                   progress: Callable[[int], None] | None = None) -> PruneResult:
    """Erase the payloads of format-2 entries created before ``before`` (aware), in batches.

    Each batch is its own short transaction under the store's write lock, so
    appends go on in between. ``progress`` is called with the running count.
    Raises :class:`AuditError` if the database fails (payloads erased by
    earlier batches stay erased; run prune again to finish and record).
    """
    if before.tzinfo is None or before.utcoffset() is None:
        raise ValueError("the prune date must be timezone-aware")
    if batch <= 0:
        raise ValueError("batch must be positive")
    engine = store.engine
    boundary = store.boundary_seq() or 0  # no boundary: no format-2 entry, nothing erasable
    erased, first_seq, last_seq, after = 0, None, None, boundary
    foreign = 0
    try:
        # Entries before the boundary (the boundary itself, chain_format, holds no text); without one, every entry.
        format_1 = _t.seq < boundary if boundary else _t.seq > 0
        with engine.connect() as conn:
            skipped = conn.execute(select(func.count()).select_from(audit_table)
                                   .where(format_1, _t.created_at < before)).scalar_one()
        while boundary:
            with locked_transaction(engine) as conn:
                if engine.dialect.name == "sqlite":
                    conn.exec_driver_sql("PRAGMA secure_delete = ON")
                seqs = conn.execute(
                    select(_t.seq).where(_t.seq > after, _t.created_at < before, _t.payload.is_not(None))
                    .order_by(_t.seq).limit(batch)).scalars().all()
                if not seqs:
                    break
                conn.execute(update(audit_table).where(_t.seq.in_(seqs)).values(payload=null()))  # SQL NULL; None would be JSON "null"
            erased += len(seqs)
            first_seq = seqs[0] if first_seq is None else first_seq
            last_seq = after = seqs[-1]
            if progress is not None:
                progress(erased)
        # What the record says is what is erased and on no record yet, not only what this run erased: a run
        # that failed after some batches (or at its own record) left erasures no entry names, and this run
        # may find nothing left to erase.
        if boundary:
            with engine.connect() as conn:
                recorded = 0
                for body in conn.execute(select(_t.body).where(_t.kind == PAYLOADS_ERASED)).scalars():
                    last = body.get("last_seq") if isinstance(body, dict) else None
                    if type(last) is int and last > recorded:
                        recorded = last
                unrecorded = (_t.seq > max(boundary, recorded), _t.payload.is_(None), _t.payload_digest.is_not(None))
                # Only erasures this run's date allows are taken on: an entry created at or after it lost its
                # payload by someone else's hand (probe s59 F3: a database writer's erasure was recorded as the
                # next prune's own), and stays for verify to report.
                count, low, high = conn.execute(select(func.count(), func.min(_t.seq), func.max(_t.seq))
                                                .where(*unrecorded, _t.created_at < before)).one()
                foreign = conn.execute(select(func.count()).select_from(audit_table)
                                       .where(*unrecorded, _t.created_at >= before)).scalar_one()
            if count:
                erased, first_seq, last_seq = count, low, high
    except DB_ERRORS as exc:
        raise AuditError(f"audit prune failed on {describe(engine)} after erasing {erased} payloads: "
                         f"{reason(exc)}") from exc
    if foreign:
        not_ours = (f"{foreign} entries created on or after {format_timestamp(before)} lost their payload outside "
                    "any prune: not recorded as erased here (`govgate audit verify` reports them)")
    if not erased:
        return PruneResult(before, 0, None, None, skipped, None, not_ours if foreign else None)
    entry = store.append(PAYLOADS_ERASED, f"prune-{uuid.uuid4().hex}", principal=None, team=None, model=None,
                         body={"before": format_timestamp(before), "count": erased, "first_seq": first_seq,
                               "last_seq": last_seq, "skipped_format_1": skipped},
                         policy_revision=None)
    warning = _reclaim(store)
    if foreign:
        warning = f"{not_ours}; {warning}" if warning else not_ours
    return PruneResult(before, erased, first_seq, last_seq, skipped, entry, warning)


def _reclaim(store: AuditStore) -> str | None:
    """Make the erased bytes go away on disk as far as the database allows; a warning if it could not."""
    engine = store.engine
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            if busy is not None and busy[0]:
                return ("the WAL file could not be truncated while other connections read it; old page images "
                        "stay in it until the next checkpoint")
        elif engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"VACUUM {audit_table.name}")
    except DB_ERRORS as exc:
        return f"payloads erased, but reclaiming their space failed: {reason(exc)}"
    return None


@dataclass(frozen=True, slots=True)
class ErasureCheck:
    """What :func:`unrecorded_erasures` found: erased payloads no ``payloads_erased`` entry names.

    ``seqs`` are the first few such entries (``count`` in all); ``records`` the ``payloads_erased``
    entries looked at.
    """

    count: int
    seqs: list[int]
    records: int


@stall_watch.patient()
def unrecorded_erasures(store: AuditStore, *, shown: int = 10) -> ErasureCheck:
    """The format-2 entries whose payload is gone though they had one (a digest is chained) and whose seq
    no ``payloads_erased`` entry's ``first_seq..last_seq`` covers.

    ``payload -> NULL`` is the one UPDATE the guards allow, and it changes
    nothing the chain covers: without this check a database writer erased a
    denied request's prompt (guards intact), ``verify`` passed, and the
    console showed it as pruned or never kept. A prune records its ranges
    (a run that failed midway is recorded by the next), so an erasure outside
    every range was made by something else. Raises :class:`AuditError`.
    """
    engine = store.engine
    try:
        boundary = store.boundary_seq() or 0
        if not boundary:
            return ErasureCheck(0, [], 0)
        with engine.connect() as conn:
            ranges: list[tuple[int, int]] = []
            records: list[_Record] = []
            for record_seq, body in conn.execute(select(_t.seq, _t.body).where(_t.kind == PAYLOADS_ERASED)):
                first = body.get("first_seq") if isinstance(body, dict) else None
                last = body.get("last_seq") if isinstance(body, dict) else None
                if type(first) is int and type(last) is int and first <= last:
                    ranges.append((first, last))
                    records.append(_Record(record_seq, first, last, _moment(body.get("before"))))
            merged: list[list[int]] = []
            for first, last in sorted(ranges):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            outside = [_t.seq > boundary, _t.payload.is_(None), _t.payload_digest.is_not(None),
                       *(~_t.seq.between(first, last) for first, last in merged)]
            count = conn.execute(select(func.count()).select_from(audit_table).where(*outside)).scalar_one()
            seqs = list(conn.execute(select(_t.seq).where(*outside).order_by(_t.seq).limit(shown)).scalars()) \
                if count else []
            # Inside a record's range but not its to erase: created on or after its date, or after the record
            # itself (probe s59 F3). Legitimate prunes leave none, so each record's look finds nothing; what
            # one finds counts unless another record covers it.
            erased = (_t.payload.is_(None), _t.payload_digest.is_not(None))
            suspects: dict[int, datetime] = {}
            for record in records:
                late = _t.seq >= record.seq if record.before is None else \
                    or_(_t.seq >= record.seq, _t.created_at >= record.before)
                for seq, created_at in conn.execute(select(_t.seq, _t.created_at).where(
                        _t.seq.between(record.first, record.last), _t.seq > boundary, *erased, late)):
                    suspects[seq] = _aware(created_at)
            uncovered = sorted(seq for seq, created_at in suspects.items()
                               if not any(r.covers(seq, created_at) for r in records))
    except DB_ERRORS as exc:
        raise AuditError(f"cannot check the erased payloads in {describe(engine)}: {reason(exc)}") from exc
    return ErasureCheck(count + len(uncovered), sorted(seqs + uncovered)[:shown], len(records))


@dataclass(frozen=True, slots=True)
class _Record:
    """A ``payloads_erased`` entry: it may stand for the erasure of the entries ``first..last`` before it
    (``seq``) created before ``before`` (None: a record without a readable date covers none by time)."""

    seq: int
    first: int
    last: int
    before: datetime | None

    def covers(self, seq: int, created_at: datetime) -> bool:
        return self.first <= seq <= self.last and seq < self.seq and self.before is not None \
            and created_at < self.before


def _moment(value: object) -> datetime | None:
    """A record's ``before`` (``format_timestamp``'s text), or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _aware(moment: datetime) -> datetime:
    """A stored ``created_at`` as an aware UTC time (SQLite gives it back naive)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
