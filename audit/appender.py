"""The append itself: read the head, chain the entry, insert it, in one locked transaction.

The statements are SQLAlchemy Core compiled once per engine from the
SQLModel table (:data:`audit.tables.audit_table`), so the column list and the
dialect's SQL and paramstyle come from the schema, not from hand-written
SQL; they run on the engine's writer connection, one long-lived driver
connection per engine and process (:mod:`audit.writer`), with nothing of
SQLAlchemy on the way. Column values are stored exactly as a SQLAlchemy
insert would store them (``created_at`` as its type's bind processor makes
it, checked against the processor when the appender is built), except
``body`` and ``payload``: the body is the canonical JSON text the hash was computed
over, the payload the canonical text its digest was computed over, both
stored as is (a JSON column holds text on SQLite and keeps the text on
PostgreSQL), so each is serialised once and what is stored is byte for byte
what was hashed.

Entries are hashed in format 2 (:mod:`audit.chain`). On an empty store the
first append first writes the ``chain_format`` boundary entry (seq 1, format
1, as every boundary is) in the same transaction; a store that held entries
when it was upgraded got its boundary from the migration (audit_0002). So
the only check on the hot path is the head read that was there anyway.

``created_at`` never goes back along the chain: an entry gets the later of
the clock and its predecessor's ``created_at``, decided under the write
lock, so a clock stepped back (or another process's slower clock) repeats
the head's time rather than writing an older one. That order is what lets a
search turn a time range into a ``seq`` range (:mod:`audit.time_order`)
instead of keeping an index on ``(column, created_at)`` for each searched
column, which cost the append a third of SQLite's work (audit_0005).

Where an append's time goes, and what was tried: docs/architecture.md,
"Audit entries and the chain" (the append's cost).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Final, Protocol, Sequence

from .chain import (FORMAT_1, FORMAT_2, GENESIS_HASH, canonical_text, chain_hash, entry_payload_with_body,
                    format_timestamp, hashed_fields)
from .errors import CorruptEntryError
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID
#: The boundary entry every format-2 chain has (its body, hashed in format 1).
BOUNDARY_BODY_TEXT: Final = canonical_text({"format": FORMAT_2})
#: The format-2 hashed fields the append binds besides the body (spliced in as its text).
_V2_OTHER_FIELDS: Final = frozenset(hashed_fields(FORMAT_2)) - {"body"}
_BOUNDARY_FIELDS: Final = {"request_id": CHAIN_FORMAT_REQUEST_ID, "kind": CHAIN_FORMAT, "principal": None,
                           "team": None, "model": None, "policy_revision": None, "terminal_request_id": None}


#: Every appender of this process, so a forked child starts with empty queues.
_APPENDERS: "weakref.WeakSet[Appender]" = weakref.WeakSet()
_SAVEPOINT: Final = "SAVEPOINT govgate_append"
_ROLLBACK_TO_SAVEPOINT: Final = "ROLLBACK TO SAVEPOINT govgate_append"
_RELEASE_SAVEPOINT: Final = "RELEASE SAVEPOINT govgate_append"


#: How ``created_at`` is bound: the SQLite text (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC) or the aware datetime.
CREATED_AT_SQLITE_TEXT: Final = "sqlite-text"
CREATED_AT_DATETIME: Final = "datetime"


@dataclass(frozen=True, slots=True)
class AppendStatements:
    """The append's SQL for one database, compiled from the SQLModel table where SQLAlchemy is loaded.

    Plain strings and names (:func:`audit.append_plan.append_statements` makes
    them), so a process without SQLAlchemy can be handed them
    (:mod:`audit.driver_store`). ``names`` are the insert's binds in order
    (``positional``) or by name; ``created_at`` is how that column is bound.
    """

    head_sql: str
    insert_sql: str
    names: tuple[str, ...]
    positional: bool
    begin: tuple[str, ...]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"head_sql": self.head_sql, "insert_sql": self.insert_sql, "names": list(self.names),
                "positional": self.positional, "begin": list(self.begin), "created_at": self.created_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AppendStatements":
        return cls(head_sql=str(data["head_sql"]), insert_sql=str(data["insert_sql"]),
                   names=tuple(str(n) for n in data["names"]), positional=bool(data["positional"]),
                   begin=tuple(str(b) for b in data["begin"]), created_at=str(data["created_at"]))


class Writer(Protocol):
    """The connection an appender writes on (:class:`audit.writer.WriterConnection`, or the driver store's)."""

    def run(self, begin: tuple[str, ...], work: Callable[[Any], Any], since: float | None = None) -> Any: ...

    def answered(self) -> None: ...

    def wrap(self, exc: Exception) -> Exception: ...

    def lost(self, exc: Exception) -> bool: ...


@dataclass(frozen=True, slots=True)
class Chained:
    """What the append decided inside the lock: the entry's place on the chain."""

    seq: int
    created_at: datetime
    prev_hash: str
    hash: str


class _Pending:
    """One append waiting for (or being written by) the thread that leads the next transaction."""

    __slots__ = ("fields", "body_text", "payload_text", "alongside", "chained", "error", "event", "lead", "arrived")

    def __init__(self, fields: dict[str, Any], body_text: str, payload_text: str | None,
                 alongside: Callable[[Any], None] | None) -> None:
        self.fields = fields
        self.body_text = body_text
        self.payload_text = payload_text
        self.alongside = alongside
        self.chained: Chained | None = None
        self.error: BaseException | None = None
        self.event: threading.Event | None = None  # only for a thread that waits for a leader
        self.lead = False  # handed the lead by the previous leader
        #: When it was asked for (monotonic): its whole wait, queue and lock, is bounded from here.
        self.arrived = time.monotonic()

    def outcome(self) -> Chained:
        if self.error is not None:
            raise self.error
        assert self.chained is not None, "an append left without an outcome"
        return self.chained


class _Refused(Exception):
    """An entry of a batch written without savepoints was refused: roll the transaction back and write the
    others again, each on a savepoint (never seen outside :meth:`Appender._lead`)."""

    def __init__(self, pending: _Pending) -> None:
        super().__init__("an entry of the batch was refused")
        self.pending = pending


def _abandoned(exc: BaseException) -> OSError:
    """What the others in a batch get when its leader is interrupted (an OSError: callers fail closed on it)."""
    return OSError(f"audit append abandoned: the thread writing it was interrupted ({type(exc).__name__})")


class Appender:
    """The append statements of one database, run on a writer connection made on first use.

    ``statements`` come compiled from the SQLModel table
    (:func:`audit.append_plan.append_statements`); ``writer`` makes the
    connection they run on (:func:`audit.writer.writer_for` of an engine, or
    the driver store's own). Nothing here imports SQLAlchemy, so a process
    that only appends need not load it (:mod:`audit.driver_store`).
    """

    def __init__(self, statements: AppendStatements, writer: Callable[[], Writer]) -> None:
        self._begin = statements.begin
        self._make_writer = writer
        self._writer: Writer | None = None  # made at the first append (a mock engine has none)
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []  # appends waiting for the next transaction
        self._leader: int | None = None  # the thread writing a transaction now (-1: handed on, not yet awake)
        _APPENDERS.add(self)
        self._head_sql = statements.head_sql
        self._insert_sql = statements.insert_sql
        self._positional = statements.positional
        self._names = statements.names
        if statements.created_at == CREATED_AT_SQLITE_TEXT:
            self._created_at: Callable[[datetime, str], Any] = lambda _now, iso: sqlite_text(iso)
        elif statements.created_at == CREATED_AT_DATETIME:
            self._created_at = lambda now, _iso: now
        else:
            raise ValueError(f"unknown created_at binding {statements.created_at!r}")

    def append(self, fields: dict[str, Any], body_text: str, payload_text: str | None,
               payload_digest: str | None, alongside: Callable[[Any], None] | None = None) -> Chained:
        """Put one entry at the head of the chain; ``fields`` are the caller's columns.

        ``fields`` holds ``request_id``, ``kind``, ``principal``, ``team``,
        ``model``, ``policy_revision`` and ``terminal_request_id``;
        ``body_text`` is the body's canonical JSON, ``payload_text`` the
        payload's (or None) and ``payload_digest`` its digest. The write lock
        is held from the head read to commit, and ``created_at`` is taken
        under it, so entries are numbered and timed in one order across
        processes. Database errors leave as SQLAlchemy exceptions (see :mod:`audit.writer`).
        ``alongside`` runs on the same cursor after the insert, before
        commit, still under the lock: what it writes commits with the entry
        or not at all, and an exception from it rolls both back (the key
        store writes key rows this way); it may run on another thread (below),
        and twice: once in a transaction then rolled back (below).

        Group commit: threads of this process that append while another
        thread's transaction is running queue up, and the next transaction
        writes all of them, a statement each, and commits once; when one
        entry is refused (by the database or its ``alongside``), it keeps
        that refusal, the transaction is rolled back and the others are
        written again in a new one, each on its own savepoint, so that any
        other refusal rolls back that entry alone (:meth:`_write`). Each
        caller returns when its entry is committed, or raises what refused
        it. The thread that writes a batch hands the next one to the first
        thread waiting, so no caller writes others' entries forever.
        A single thread appending alone pays for none of it but two uncontended locks.
        """
        pending = _Pending({**fields, "payload_digest": payload_digest}, body_text, payload_text, alongside)
        me = threading.get_ident()
        with self._queue_lock:
            if self._leader == me:  # from an alongside: it would wait for the very batch it is part of
                raise RuntimeError("an audit append cannot run inside another append's transaction (alongside)")
            self._queue.append(pending)
            if self._leader is None:
                self._leader = me
            else:
                pending.event = threading.Event()
        if pending.event is not None:
            pending.event.wait()  # the leader writes it, or hands this thread the lead
            if not pending.lead:
                return pending.outcome()
        self._lead(me)
        return pending.outcome()

    def append_many(self, entries: Sequence[tuple[dict[str, Any], str, str | None, str | None]]) -> list[_Pending]:
        """Several entries (each ``fields``, ``body_text``, ``payload_text``, ``payload_digest``, as for
        :meth:`append`) queued at once and written in one transaction where possible; each one's holder,
        in order (``outcome()`` returns its chaining or raises what refused it).

        For a caller that gathers other callers' appends on one thread of its
        own (the gateway's audit thread, ``gateway/requests/append_queue.py``)
        instead of a thread per append: the entries join the group commit's
        queue together, behind any transaction running, so they are written
        in the same transaction (a statement each; the others again, on a
        savepoint each, when one of them is refused: :meth:`_write`) and this
        thread waits once, not once per entry.
        """
        pendings = [_Pending({**fields, "payload_digest": digest}, body_text, payload_text, None)
                    for fields, body_text, payload_text, digest in entries]
        if not pendings:
            return pendings
        me = threading.get_ident()
        with self._queue_lock:
            if self._leader == me:
                raise RuntimeError("an audit append cannot run inside another append's transaction (alongside)")
            self._queue.extend(pendings)  # together: a leader's snapshot takes all of them or none
            lead = self._leader is None
            if lead:
                self._leader = me
            else:
                for pending in pendings:
                    pending.event = threading.Event()
        if not lead:
            first = pendings[0]
            assert first.event is not None
            first.event.wait()  # the batch that holds them all was written, or this thread leads the next
            lead = first.lead
        if lead:
            self._lead(me)
        for pending in pendings:
            if pending.event is not None:
                pending.event.wait()  # set by the same transaction's end: already set
        return pendings

    def _lead(self, me: int) -> None:
        """Write everything queued so far in one transaction, then hand the lead to the next one waiting."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
            self._leader = me
        writer = self._writer
        # The batch waits for the database only what is left of its oldest entry's busy timeout: an append
        # queued behind a leader that waited it out then waited it whole again (probe s55 F3).
        since = min(pending.arrived for pending in batch)
        try:
            if writer is None:
                writer = self._writer = self._make_writer()
            try:
                writer.run(self._begin, lambda cursor: self._write(cursor, batch, careful=False), since)
            except _Refused as refused:  # rolled back: the others again, each on a savepoint, from the head now
                rest = [pending for pending in batch if pending is not refused.pending]
                writer.run(self._begin, lambda cursor: self._write(cursor, rest, careful=True), since)
        except BaseException as exc:
            for pending in batch:  # the transaction is rolled back: none of them is written
                pending.chained = None
                pending.error = exc if isinstance(exc, Exception) else _abandoned(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._queue_lock:
                if self._queue:
                    successor = self._queue[0]
                    self._leader = -1  # taken: nobody else may lead before the successor wakes
                    successor.lead = True
                else:
                    successor = None
                    self._leader = None
            for pending in batch:
                if pending.event is not None:
                    pending.event.set()
            if successor is not None:
                assert successor.event is not None  # it queued while a leader was writing
                successor.event.set()

    def _write(self, cursor: Any, batch: list[_Pending], careful: bool) -> None:
        """Inside the locked transaction: chain and insert each queued entry.

        Several entries are first written as one entry is, a statement each
        (``careful`` False). The first one refused (by the database, or by
        its ``alongside``) keeps that refusal as its outcome and raises
        :class:`_Refused`; :meth:`_lead` rolls the transaction back and
        writes the others again ``careful``ly, each on its own savepoint, so
        a refusal rolls back that entry alone, chained from the head read in
        the new transaction. The refused entry is not tried again: what
        refused it (a lock waited for past its timeout, say) would be waited
        for again. A savepoint per entry is what every batch cost before
        2026-12-02: three statements (round trips on PostgreSQL) instead of
        one under the lock, and on PostgreSQL a subtransaction each, past 64
        of which every snapshot on the server must look them up in
        ``pg_subtrans`` (docs/architecture.md, "Group commit"). A connection
        lost under the batch (:meth:`Writer.lost`: the server gone, the
        stall watch's cut) is not an entry's refusal: it fails every entry,
        never retried, as it always did.
        """
        cursor.execute(self._head_sql)
        head = cursor.fetchone()
        now = datetime.now(timezone.utc)
        if head is not None:
            now = _not_before(now, head)
        if head is None:  # a new store: its first entry is the format boundary
            boundary = self._insert(cursor, _BOUNDARY_FIELDS, 1, GENESIS_HASH, now, BOUNDARY_BODY_TEXT, None,
                                    FORMAT_1)
            head = (boundary.seq, boundary.hash)
        if len(batch) == 1:  # one entry: a failure rolls back the transaction, no savepoint needed
            [pending] = batch
            pending.chained = self._insert(cursor, pending.fields, head[0] + 1, head[1], now, pending.body_text,
                                           pending.payload_text, FORMAT_2)
            if pending.alongside is not None:
                pending.alongside(cursor)
            return
        writer = self._writer
        if not careful:
            chained_all: list[Chained] = []
            for pending in batch:
                try:
                    chained = self._insert(cursor, pending.fields, head[0] + 1, head[1], now, pending.body_text,
                                           pending.payload_text, FORMAT_2)
                    if pending.alongside is not None:
                        pending.alongside(cursor)
                except Exception as exc:
                    if writer is None or writer.lost(exc):
                        raise  # the transaction's failure, not this entry's: every entry fails, as one append would
                    pending.error = writer.wrap(exc)  # this entry's, final: the others are written again
                    writer.answered()
                    raise _Refused(pending) from exc
                chained_all.append(chained)
                head = (chained.seq, chained.hash)
                if writer is not None:
                    writer.answered()  # a batch the server answers entry by entry is not a stalled one
            for pending, chained in zip(batch, chained_all):
                pending.chained = chained
            return
        for pending in batch:
            cursor.execute(_SAVEPOINT)
            try:
                chained = self._insert(cursor, pending.fields, head[0] + 1, head[1], now, pending.body_text,
                                       pending.payload_text, FORMAT_2)
                if pending.alongside is not None:
                    pending.alongside(cursor)
            except Exception as exc:  # this entry only: the others go on without it
                cursor.execute(_ROLLBACK_TO_SAVEPOINT)
                cursor.execute(_RELEASE_SAVEPOINT)
                pending.error = writer.wrap(exc) if writer is not None else exc
                if writer is not None:
                    writer.answered()
                continue
            cursor.execute(_RELEASE_SAVEPOINT)
            pending.chained = chained
            head = (chained.seq, chained.hash)
            if writer is not None:
                writer.answered()  # a batch the server answers entry by entry is not a stalled one

    def _insert(self, cursor: Any, fields: dict[str, Any], seq: int, prev_hash: str, now: datetime,
                body_text: str, payload_text: str | None, format: int) -> Chained:
        """Chain and insert one entry; ``fields`` are its hashed fields but the body and its place on the chain.

        Format 2 builds what :func:`audit.chain.entry_payload_with_body`
        builds (the stored body text spliced into the canonical JSON of the
        other fields, which sort after ``"body"``) without that function's
        per-call copying; the key check below is its check, and
        tests/audit/test_audit_append.py holds the two together.
        """
        created_at = format_timestamp(now)
        hashed = {**fields, "seq": seq, "created_at": created_at, "prev_hash": prev_hash}
        if format == FORMAT_2:
            if hashed.keys() != _V2_OTHER_FIELDS:  # never silently hash a field too few or too many
                raise ValueError(f"hashed fields mismatch: expected {sorted(_V2_OTHER_FIELDS)}, got {sorted(hashed)}")
            rest = canonical_text(hashed)
            entry_hash = chain_hash(prev_hash, f'{{"body":{body_text},{rest[1:]}'.encode("utf-8"))
        else:
            entry_hash = chain_hash(prev_hash, entry_payload_with_body(hashed, body_text, format=format))
            hashed["payload_digest"] = None  # format 1 hashes no digest; the column is NULL
        row = hashed
        row["created_at"] = self._created_at(now, created_at)
        row["body"] = body_text
        row["payload"] = payload_text
        row["hash"] = entry_hash
        cursor.execute(self._insert_sql, [row[n] for n in self._names] if self._positional else row)
        return Chained(seq, now, prev_hash, entry_hash)


def _not_before(now: datetime, head: Any) -> datetime:
    """``now``, or the head's ``created_at`` when that is later: time never goes back along the chain.

    ``head`` is ``(seq, hash, created_at)`` as the driver returns it: the
    stored text on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), an aware
    datetime on PostgreSQL. A head whose time cannot be read refuses the
    append (fail closed): it is a tampered row, which ``verify`` reports too.
    """
    stored = head[2]
    try:
        if isinstance(stored, str):
            stored = datetime.fromisoformat(stored)
        stored = stored.replace(tzinfo=timezone.utc) if stored.tzinfo is None else stored.astimezone(timezone.utc)
        return stored if stored > now else now
    except (TypeError, ValueError, AttributeError) as exc:
        raise CorruptEntryError(head[0], f"the chain head's created_at is unreadable ({exc})") from None


def sqlite_text(iso: str) -> str:
    """``2024-02-29T23:59:58.000007+00:00`` -> ``2024-02-29 23:59:58.000007``."""
    return f"{iso[:10]} {iso[11:26]}"


def _reset_after_fork() -> None:
    """In a forked child: the threads that queued or led appends in the parent do not exist here."""
    for appender in list(_APPENDERS):
        appender._queue_lock = threading.Lock()
        appender._queue = []
        appender._leader = None


os.register_at_fork(after_in_child=_reset_after_fork)
