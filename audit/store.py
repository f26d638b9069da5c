"""The append-only, hash-chained audit store: put entries on the chain, read them back.

Each append holds the write lock (the one :func:`audit.db.locked_transaction`
takes) from reading the head to commit (:mod:`audit.appender`); every failure is an :class:`AuditError`, so
callers fail closed with one ``except``.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Sequence

from sqlalchemy import Engine, Select, exists, or_, select
from sqlalchemy.exc import DataError, IntegrityError

from .append_plan import append_statements
from .appender import Appender, Chained
from .chain import FORMAT_1, FORMAT_2
from .db import DB_ERRORS, describe, reason
from .entry import AuditEntry
from .entry_args import AppendArgs, PreparedEntry, prepared_entry
from .errors import AuditError, CorruptEntryError, DuplicateTerminalError
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID, REQUEST
from .lookup import KeyedLookup
from .tables import audit_table
from .writer import writer_for

# Reads use SQLAlchemy Core, not ORM sessions: no identity-map bookkeeping,
# and callers get frozen AuditEntry values. Appends run statements compiled
# once on the engine's DBAPI connection (audit/appender.py), because the
# append is on every request's path.
_t = audit_table.c


class AuditStore:
    """Append to and read the audit trail in the database behind ``engine``.

    The schema must exist (call :func:`audit.db.migrate` once at start-up).
    Thread- and process-safe; create one per process and share it.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._compiled_appender: Appender | None = None
        self._terminal_lookup: KeyedLookup | None = None
        self._boundary: int | None = None  # seq of the chain_format entry, once seen (it never moves)

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- writing -----------------------------------------------------------

    def append(
        self,
        kind: str,
        request_id: str,
        *,
        principal: str | None,
        team: str | None,
        model: str | None,
        body: Mapping[str, Any],
        policy_revision: str | None,
        payload: Mapping[str, Any] | None = None,
        alongside: Callable[[Any], None] | None = None,
    ) -> AuditEntry:
        """Append one entry at the head of the chain and return it as stored.

        ``body`` must be JSON-compatible; it is stored (and returned) in its
        JSON round-tripped form, e.g. tuples become lists, so that what is
        hashed is exactly what reads back. ``payload`` holds the entry's
        erasable texts (prompt, output): stored as canonical JSON with a
        random ``"salt"`` added (a reserved key), only its SHA-256 is chained,
        so it can later be erased (``govgate audit prune``) while the chain
        verifies. Raises :class:`InvalidEntryError` for bad arguments,
        :class:`DuplicateTerminalError` if ``kind`` is terminal and the request
        already has a terminal entry, and :class:`AuditError` if the database
        fails (nothing was recorded). ``alongside(cursor)`` runs inside the
        append's transaction (see :meth:`audit.appender.Appender.append`);
        its own exceptions other than database errors reach the caller
        unchanged, after the rollback.
        """
        entry = prepared_entry(kind, request_id, principal=principal, team=team, model=model, body=body,
                               policy_revision=policy_revision, payload=payload)
        return self._stored(entry, lambda: self._appender().append(entry.fields, entry.body_text,
                                                                   entry.payload_text, entry.digest, alongside))

    def append_many(self, appends: Sequence[AppendArgs]) -> list[AuditEntry | Exception]:
        """Each of ``appends`` as :meth:`append` writes it, all queued at once for one group commit: per
        append, in order, its entry as stored or the exception :meth:`append` would have raised.

        One append refused (bad arguments, a duplicate terminal entry) takes
        none of the others with it; a transaction the database refuses fails
        each append in it, as it fails each of the threads a group commit
        serves. For a caller that gathers many requests' appends on one
        thread (``gateway/requests/append_queue.py``): a thread per append
        cost the gateway more CPU than the append itself under load.
        """
        outcomes: list[AuditEntry | Exception | None] = [None] * len(appends)
        prepared: list[tuple[int, PreparedEntry]] = []
        for index, args in enumerate(appends):
            try:
                prepared.append((index, args.prepared()))
            except Exception as exc:  # noqa: BLE001 - this append's refusal, as append() raises it
                outcomes[index] = exc
        if prepared:
            try:
                pendings = self._appender().append_many(
                    [(entry.fields, entry.body_text, entry.payload_text, entry.digest) for _, entry in prepared])
            except Exception as exc:  # noqa: BLE001 - e.g. called inside an append's own transaction
                pendings = None
                for index, _ in prepared:
                    outcomes[index] = exc
            if pendings is not None:
                for (index, entry), pending in zip(prepared, pendings):
                    try:
                        outcomes[index] = self._stored(entry, pending.outcome)
                    except Exception as exc:  # noqa: BLE001 - this append's refusal
                        outcomes[index] = exc
        assert all(outcome is not None for outcome in outcomes), "an append left without an outcome"
        return outcomes  # type: ignore[return-value]

    def _stored(self, entry: PreparedEntry, chain: Callable[[], Chained]) -> AuditEntry:
        """The entry ``chain()`` put in the chain, or the store's error for what refused it."""
        try:
            chained = chain()
        except IntegrityError as exc:
            if entry.terminal_request_id is not None:
                existing = self.terminal_for(entry.fields["request_id"])
                if existing is not None:
                    raise DuplicateTerminalError(entry.fields["request_id"], existing.kind) from exc
            raise AuditError(f"audit append refused by {describe(self._engine)}: {exc.orig}") from exc
        except DB_ERRORS as exc:
            raise AuditError(f"audit append failed on {describe(self._engine)}: {reason(exc)}") from exc
        return entry.entry(chained)

    def _appender(self) -> Appender:
        """The compiled append statements, built on first use (a race only builds them twice)."""
        appender = self._compiled_appender
        if appender is None:
            engine = self._engine
            appender = self._compiled_appender = Appender(append_statements(engine), lambda: writer_for(engine))
        return appender

    # -- reading -----------------------------------------------------------

    def head(self) -> AuditEntry | None:
        """The newest entry, or None when the trail is empty."""
        rows = self._fetch(select(audit_table).order_by(_t.seq.desc()).limit(1))
        return rows[0] if rows else None

    def get(self, seq: int) -> AuditEntry | None:
        """The entry numbered ``seq``, if it exists."""
        rows = self._fetch(select(audit_table).where(_t.seq == seq), seq=seq)
        return rows[0] if rows else None

    def terminal_for(self, request_id: str) -> AuditEntry | None:
        """The request's terminal entry (completion/failed/timed_out/cancelled), if any."""
        lookup = self._terminal_lookup
        if lookup is None:
            lookup = self._terminal_lookup = KeyedLookup(self._engine, _t.terminal_request_id, self.format_of)
        try:
            rows = lookup.rows(request_id)  # through the unique index on terminal_request_id
        except DB_ERRORS as exc:
            raise AuditError(f"audit read failed on {describe(self._engine)}: {reason(exc)}") from exc
        return rows[0] if rows else None

    def entries_for(self, request_id: str) -> list[AuditEntry]:
        """Every entry of one request, oldest first."""
        return self._fetch(select(audit_table).where(_t.request_id == request_id).order_by(_t.seq))

    def request_entries(self, request_ids: Sequence[str]) -> dict[str, AuditEntry]:
        """The ``request`` entries of ``request_ids`` that exist, by request id (through its index)."""
        found: dict[str, AuditEntry] = {}
        ids = list(dict.fromkeys(request_ids))
        for start in range(0, len(ids), 500):  # (a bound on the statement's parameters)
            stmt = select(audit_table).where(_t.kind == REQUEST, _t.request_id.in_(ids[start:start + 500]))
            found.update((entry.request_id, entry) for entry in self._fetch(stmt))
        return found

    def requests_without_terminal(self, *, before: datetime, after: datetime | None = None,
                                  page_after: AuditEntry | None = None, limit: int = 100) -> list[AuditEntry]:
        """``request`` entries created in ``[after, before)`` whose request has no terminal entry.

        Denied requests are among them (they never end); telling them apart
        is the caller's business. Ordered by time, then seq; pass the last
        entry of a page as ``page_after`` for the next one. The window is read
        through the ``created_at`` index (which also gives the order) and each
        candidate's terminal through the unique index on
        ``terminal_request_id``, so a call costs its window, not the log.
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        ended = audit_table.alias("ended")
        stmt = (select(audit_table)
                .where(_t.kind == REQUEST, _t.created_at < before,
                       ~exists().where(ended.c.terminal_request_id == _t.request_id))
                .order_by(_t.created_at, _t.seq).limit(limit))
        if after is not None:
            stmt = stmt.where(_t.created_at >= after)
        if page_after is not None:
            # Keyset on (created_at, seq), spelt so the range part can use the index.
            stmt = stmt.where(_t.created_at >= page_after.created_at,
                              or_(_t.created_at > page_after.created_at, _t.seq > page_after.seq))
        return self._fetch(stmt)

    def tail(self, n: int = 20) -> list[AuditEntry]:
        """The last ``n`` entries in seq order (oldest of them first)."""
        if n <= 0:
            return []
        rows = self._fetch(select(audit_table).order_by(_t.seq.desc()).limit(n))
        rows.reverse()
        return rows

    def iter_entries(self, since_seq: int = 0, batch: int = 1000) -> Iterator[AuditEntry]:
        """Every entry with ``seq > since_seq`` in seq order, in constant memory.

        Reads in keyset-paginated batches, each its own short transaction, so
        a long scan neither holds a snapshot open nor blocks WAL checkpoints;
        entries appended during the scan are included. An undecodable row
        raises :class:`CorruptEntryError` naming its seq *after* every entry
        before it has been yielded, so verification can report the first bad
        entry.
        """
        if batch <= 0:
            raise ValueError("batch must be positive")
        last = since_seq
        while True:
            count = 0
            for entry in self._batch_after(last, batch):
                yield entry
                count += 1
                last = entry.seq
            if count < batch:
                return

    def _batch_after(self, after_seq: int, limit: int) -> Iterator[AuditEntry]:
        stmt = select(audit_table).where(_t.seq > after_seq).order_by(_t.seq).limit(limit)
        try:
            return iter(self._fetch(stmt))
        except CorruptEntryError:
            # Some row in the batch is bad; go row by row to find which one.
            return self._one_by_one_after(after_seq, limit)

    def _one_by_one_after(self, after_seq: int, limit: int) -> Iterator[AuditEntry]:
        with self._reading() as conn:
            seqs = conn.execute(select(_t.seq).where(_t.seq > after_seq).order_by(_t.seq).limit(limit)).scalars().all()
        for seq in seqs:
            entry = self.get(seq)  # raises CorruptEntryError(seq) at the bad row
            if entry is not None:
                yield entry

    # -- formats -----------------------------------------------------------

    def boundary_seq(self) -> int | None:
        """The seq of the ``chain_format`` entry (format 2 starts after it), or None if there is none yet.

        Found through the request_id index once per store object, then
        remembered: the chain is append-only, the boundary never moves.
        """
        if self._boundary is None:
            stmt = (select(_t.seq).where(_t.request_id == CHAIN_FORMAT_REQUEST_ID, _t.kind == CHAIN_FORMAT)
                    .order_by(_t.seq).limit(1))
            with self._reading() as conn:
                self._boundary = conn.execute(stmt).scalar()
        return self._boundary

    def format_of(self, seq: int) -> int:
        """The chain format of entry ``seq``: 1 up to and including the boundary, 2 after it.

        Without a boundary every entry is format 1 (a store that was never
        upgraded); :func:`audit.verify_chain` reads the boundary from the
        chain itself instead.
        """
        boundary = self.boundary_seq()
        return FORMAT_2 if boundary is not None and seq > boundary else FORMAT_1

    # -- plumbing ----------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except DB_ERRORS as exc:
            raise AuditError(f"audit read failed on {describe(self._engine)}: {reason(exc)}") from exc

    def _fetch(self, stmt: Select[Any], *, seq: int | None = None) -> list[AuditEntry]:
        """Run a SELECT of whole rows; ``seq`` names the row for error messages."""
        with self._reading() as conn:
            result = conn.execute(stmt)  # a failure here is the database's (AuditError)
            try:
                rows = result.mappings().all()
            except (ValueError, TypeError) as exc:
                # Result processing (JSON, timestamps) choked on a tampered row.
                raise CorruptEntryError(seq, str(exc)) from exc
            except DataError as exc:
                # The driver could not load a value (PostgreSQL: a created_at of 'infinity').
                raise CorruptEntryError(seq, reason(exc)) from exc
        if not rows:
            return []
        boundary = self.boundary_seq()  # one look-up per read, not per row
        if boundary is None:  # never upgraded: all format 1
            return [AuditEntry.from_row(row, FORMAT_1) for row in rows]
        return [AuditEntry.from_row(row, FORMAT_2 if row["seq"] > boundary else FORMAT_1) for row in rows]
