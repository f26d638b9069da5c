"""Walk one seq range of the chain: every check :func:`audit.verify_chain` makes, on raw rows, fast.

Each format applies to its range: entries up to and including the
``chain_format`` boundary are format 1 (the body parsed and re-serialised,
as it always was), entries after it format 2, whose *stored* body text is
hashed byte for byte (never parsed), so a duplicate key or any other
non-canonical text breaks the hash, and whose stored payload must match its
digest.

Two ways to read a row, one meaning. The *reference* statement reads the 14
columns as the driver types them, and :meth:`_Walk.walk` checks them with
the canonical encoder (the definition of each format). Format-2 rows are
read by the *fast* statement instead: SQLite hands over the body and the
payload as their stored UTF-8 bytes (no decoding and re-encoding), PostgreSQL
the timestamp as text (no datetime objects); :meth:`_Walk.walk_fast` builds
the hashed text from them only when every column holds what the store
writes (the body stored as text, every other hashed column a string or
NULL, the timestamp in the store's form), and then that text is exactly the
reference's; any other row is read again by the reference statement and
checked by the reference code, so a tampered row meets the same checks and
messages as before. Why this is fast: docs/architecture.md, "How verify is
fast".

A walk may start inside the chain (a worker's range): it then takes the
first row's seq and ``prev_hash`` on trust and reports them; whoever
stitches the ranges together checks them against the range before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring  # the C quoting of JSONEncoder(ensure_ascii=False)
from typing import Any, Callable, Final

from sqlalchemy import Engine, Text, bindparam, literal_column, select

from .chain import FORMAT_1, FORMAT_2, HASHED_FIELDS, entry_hash, format_timestamp
from .dbapi import dbapi_cursor
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID
from .tables import audit_table

_t = audit_table.c
#: The columns read, in this order (body and payload as their stored text).
NAMES: Final = ("seq", "created_at", "request_id", "kind", "principal", "team", "model", "body",
                "policy_revision", "terminal_request_id", "prev_hash", "hash", "payload", "payload_digest")
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_sha256 = hashlib.sha256
#: The ``upto`` of an open-ended range (the last one runs to the end, entries appended meanwhile included).
_UNBOUNDED: Final = 2**62
#: SQLite: the body's stored UTF-8 bytes when it is stored as TEXT, else NULL. Every TEXT value sorts at or
#: after '' and before any BLOB (the empty one included); NULL compares to nothing, numbers sort before TEXT.
_BODY_AS_STORED_BYTES: Final = ("CASE WHEN body >= '' COLLATE BINARY AND body < X'' COLLATE BINARY "
                                "THEN CAST(body AS BLOB) END")
#: At most this many distinct strings are kept quoted per walk (a few hundred principals, teams, models are usual).
_QUOTED_MAX: Final = 10_000


class Bad(Exception):
    """The first entry that does not fit, and why."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(seq, problem)
        self.seq, self.problem = seq, problem


def gap_problem(expected: int, seq: int) -> str:
    return (f"seq gap: expected entry {expected}, found {seq}; "
            f"entries {expected}..{seq - 1} are missing (deleted)")


def link_problem(seq: int) -> str:
    what = "the genesis hash" if seq == 1 else f"the hash of entry {seq - 1}"
    return (f"prev_hash mismatch: entry {seq} does not link to {what} "
            "(an entry was removed, reordered or replaced before it)")


@dataclass(frozen=True, slots=True)
class RangeResult:
    """What walking one range found.

    ``first_seq``/``first_prev`` are the range's first row (None when the
    range is empty), to be held against the range before it. ``checked``
    counts the sound entries before ``bad_seq`` (all of them when there is
    none); ``head_*`` is the last sound one (None when none was);
    ``boundary`` the format boundary in force where the walk stopped.
    ``cancelled``: the walk stopped early because a lower range had already
    found a bad entry, so this result says nothing.
    """

    first_seq: int | None
    first_prev: str | None
    checked: int
    head_seq: int | None
    head_hash: str | None
    boundary: int | None
    bad_seq: int | None = None
    problem: str | None = None
    cancelled: bool = False


class Statements:
    """The reference and fast SELECTs of a range, compiled for one engine's dialect."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self.postgresql = dialect.name == "postgresql"
        self.positional = dialect.positional
        # PostgreSQL's driver would parse JSON; its text form is the stored text exactly (JSON, not JSONB).
        # pg_catalog.text: a type named "text" earlier on the search_path must not stand in for it.
        pg_text = lambda column: literal_column(f"CAST({column} AS pg_catalog.text)", Text)  # noqa: E731
        reference = [pg_text(n) if n in ("body", "payload") and self.postgresql else _t[n] for n in NAMES]
        fast = list(reference)
        if self.postgresql:
            # The timestamp as text in UTC (AT TIME ZONE is pg_catalog.timezone; DateStyle ISO is set
            # per batch), not a datetime object per row; trailing zeros of the fraction are left out.
            fast[1] = literal_column("CAST((created_at AT TIME ZONE 'UTC') AS pg_catalog.text)", Text)
        elif _sqlite_utf8(engine):
            # The stored UTF-8 bytes, hashed as they are; a body not stored as text reads as NULL and
            # goes to the reference check (which reports it). "Stored as text" is told by SQLite's order
            # of storage classes (NULL < numbers < TEXT < BLOB, whatever the column's affinity; BINARY
            # named, so no collation of the column's can stand in): two comparisons, cheaper per row
            # than a call of typeof().
            fast[7] = literal_column(_BODY_AS_STORED_BYTES)
            fast[12] = literal_column("CAST(payload AS BLOB)")
        self.reference = self._range_sql(reference, dialect)
        self.fast = self._range_sql(fast, dialect)
        self.one = str(select(*reference).where(_t.seq == bindparam("seq")).compile(dialect=dialect))
        self.begin: tuple[str, ...] = ("SET LOCAL datestyle TO 'ISO'",) if self.postgresql else ()
        processor = _t.created_at.type.dialect_impl(dialect).result_processor(dialect, None)
        self.created_at: Callable[[Any], datetime] = processor or (lambda value: value)

    @staticmethod
    def _range_sql(columns: list[Any], dialect: Any) -> str:
        stmt = select(*columns).where(_t.seq > bindparam("after"), _t.seq <= bindparam("upto")).order_by(_t.seq)
        return str(stmt.compile(dialect=dialect)) + " LIMIT {limit}"  # the same on both dialects

    def params(self, **values: Any) -> Any:
        return tuple(values.values()) if self.positional else values


def _sqlite_utf8(engine: Engine) -> bool:
    """Whether the SQLite file stores text as UTF-8 (CAST AS BLOB is then the bytes hashed)."""
    with dbapi_cursor(engine) as cursor:
        cursor.execute("PRAGMA encoding")
        (encoding,) = cursor.fetchone()
    return str(encoding).upper() == "UTF-8"


def walk_range(engine: Engine, after: int, upto: int | None, boundary: int | None, *, batch: int,
               statements: Statements | None = None, stop_below: Callable[[], int] | None = None, mmap_bytes: int = 0) -> RangeResult:
    """Check the entries with ``after < seq <= upto`` (``upto`` None: to the end, appends included).

    ``boundary`` is the format boundary in force at the range's start. The
    first row's seq and ``prev_hash`` are taken on trust and reported in the
    result, for the caller to hold against the range before. ``stop_below()``
    gives the lowest bad seq found elsewhere: once it is at or below
    ``after`` this range cannot matter and the walk stops (cancelled).
    ``mmap_bytes`` (SQLite): read the file through a memory map of that size
    for this walk (the connection's setting is put back afterwards).
    Database errors propagate (SQLAlchemy ``DBAPIError``).
    """
    statements = statements or Statements(engine)
    walk = _Walk(statements, boundary)
    last = upto if upto is not None else _UNBOUNDED
    with dbapi_cursor(engine) as cursor:
        restore = _map_file(cursor, mmap_bytes) if mmap_bytes and not statements.postgresql else None
        try:
            walk.one = lambda seq: _fetch_one(cursor, statements, seq)
            while True:
                if stop_below is not None and stop_below() <= after:
                    return walk.result(cancelled=True)
                fast = walk.boundary is not None
                sql = (statements.fast if fast else statements.reference).format(limit=int(batch))
                for statement in statements.begin:
                    cursor.execute(statement)
                rows, undecodable = _fetch_decodable(cursor, statements, sql, after, last)
                done = after
                if rows:
                    try:
                        if fast:
                            walk.walk_fast(rows)
                            done = rows[-1][0]
                        else:  # up to the boundary if it is in this batch: the rows after it are read fast
                            done = walk.walk(rows)
                    except Bad as bad:
                        return walk.result(bad=bad)
                if undecodable is not None and (not rows or done == rows[-1][0]):
                    return walk.result(bad=walk.undecodable(cursor, *undecodable))
                if undecodable is None and len(rows) < batch and (not rows or done == rows[-1][0]):
                    return walk.result()
                after = done
        finally:
            if restore is not None:
                cursor.execute(f"PRAGMA mmap_size = {int(restore)}")


def _map_file(cursor: Any, size: int) -> int:
    """Set SQLite's ``mmap_size`` for this connection; returns the value to put back."""
    cursor.execute("PRAGMA mmap_size")
    row = cursor.fetchone()
    cursor.execute(f"PRAGMA mmap_size = {int(size)}")
    return int(row[0]) if row else 0


def _undecodable_column(exc: BaseException) -> str | None:
    """The column named by SQLite's "Could not decode to UTF-8 column 'x'" (a text value that is not UTF-8)."""
    text = str(getattr(exc, "orig", None) or exc)
    if not text.startswith("Could not decode to UTF-8 column "):
        return None
    return text[len("Could not decode to UTF-8 column "):].split(" ", 1)[0].strip("'")


def _fetch_decodable(cursor: Any, statements: Statements, sql: str, after: int,
                     last: int) -> tuple[list[tuple[Any, ...]], tuple[int, str] | None]:
    """A batch, and None; or, when a stored text is not UTF-8 (SQLite then fails the whole fetch), the rows
    before the first such entry and (its seq, the column)."""
    try:
        return _fetch_batch(cursor, statements, sql, statements.params(after=after, upto=last)), None
    except Exception as exc:
        if statements.postgresql or _undecodable_column(exc) is None:
            raise
    cursor.execute(f"SELECT seq FROM {audit_table.name} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT "
                   f"{sql.rsplit('LIMIT', 1)[1].strip()}", (after, last))
    rows: list[tuple[Any, ...]] = []
    for (seq,) in cursor.fetchall():
        try:
            rows.extend(_fetch_batch(cursor, statements, sql, statements.params(after=seq - 1, upto=seq)))
        except Exception as exc:
            column = _undecodable_column(exc)
            if column is None:
                raise
            return rows, (seq, column)
    return rows, None


def _fetch_one(cursor: Any, statements: Statements, seq: int) -> tuple[Any, ...] | None:
    rows = _fetch_batch(cursor, statements, statements.one, statements.params(seq=seq))
    return rows[0] if rows else None


def _fetch_batch(cursor: Any, statements: Statements, sql: str, params: Any) -> list[tuple[Any, ...]]:
    """One batch, its own short read (no snapshot held, no WAL pinned).

    On PostgreSQL a ``created_at`` Python cannot hold (``infinity``, year
    10000, BC: only SQL can write one) fails the whole batch's fetch with the
    driver's ``DataError``, and the verdict would be a read failure instead
    of the entry. The batch is then read again with such values as their
    text, which the walk names as an edited ``created_at``. Only then: the
    lenient loader is psycopg's Python one, several times slower than its C one.
    """
    try:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    except Exception as exc:
        if not (statements.postgresql and type(exc).__name__ == "DataError"):
            raise
        cursor.connection.rollback()
        for statement in statements.begin:
            cursor.execute(statement)
        _keep_bad_timestamps(cursor)
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    cursor.connection.commit()
    return rows


_lenient_loader: Any = None


def _keep_bad_timestamps(cursor: Any) -> None:
    """Make this psycopg cursor hand back a ``timestamptz`` Python cannot hold as its text, not raise."""
    global _lenient_loader
    if _lenient_loader is None:
        from psycopg import DataError as Unloadable
        from psycopg.types.datetime import TimestamptzLoader

        class LenientTimestamptzLoader(TimestamptzLoader):
            def load(self, data: Any) -> Any:
                try:
                    return super().load(data)
                except Unloadable:
                    return bytes(data).decode("utf-8", "replace")

        _lenient_loader = LenientTimestamptzLoader
    cursor.adapters.register_loader("timestamptz", _lenient_loader)


class _Walk:
    """The walk's state across batches: the expected seq and link, the format in force."""

    def __init__(self, statements: Statements, boundary: int | None) -> None:
        self.created_at = statements.created_at
        self.pad_fraction = statements.postgresql  # PostgreSQL leaves trailing zeros out of the text form
        self.boundary = boundary
        self.checked = 0
        self.head_hash: str | None = None
        self.head_seq: int | None = None
        self.first: tuple[int, str] | None = None
        self.one: Callable[[int], tuple[Any, ...] | None] = lambda seq: None
        #: ``encode_basestring`` of the strings met in the repeating columns (:meth:`walk_fast`).
        self.quoted: dict[str, str] = {}

    def result(self, *, bad: Bad | None = None, cancelled: bool = False) -> RangeResult:
        first = self.first or (None, None)
        return RangeResult(first_seq=first[0], first_prev=first[1], checked=self.checked, head_seq=self.head_seq,
                           head_hash=self.head_hash, boundary=self.boundary, bad_seq=bad.seq if bad else None,
                           problem=bad.problem if bad else None, cancelled=cancelled)

    def undecodable(self, cursor: Any, seq: int, column: str) -> Bad:
        """The verdict on entry ``seq``, whose ``column`` holds text that is not UTF-8 (SQLite only)."""
        if self.head_seq is not None and seq != self.head_seq + 1:
            return Bad(seq, gap_problem(self.head_seq + 1, seq))
        cursor.execute(f"SELECT CAST(prev_hash AS BLOB) FROM {audit_table.name} WHERE seq = ?", (seq,))
        found = cursor.fetchone()
        prev = found[0] if found else None
        prev = prev.decode("utf-8", "replace") if isinstance(prev, bytes) else prev
        if self.head_seq is None:  # the range's first row: its link is the stitcher's to check
            self.first = (seq, prev)
        elif prev != self.head_hash:  # the link before the rest, as the walk and (at a range's edge) the stitcher
            return Bad(seq, link_problem(seq))
        return Bad(seq, f"audit entry {seq} cannot be decoded: its {column} is not valid UTF-8 text "
                        "(the entry was edited)")

    def _expected(self, first_row: tuple[Any, ...]) -> tuple[int, str]:
        """The seq and prev_hash the next row must have."""
        if self.head_seq is not None:
            return self.head_seq + 1, self.head_hash  # type: ignore[return-value]
        self.first = (first_row[0], first_row[10])
        return self.first  # taken on trust, reported in the result

    def walk(self, rows: list[tuple[Any, ...]]) -> int:
        """Reference rows (driver-typed), checked by the formats' definitions; returns the last seq checked.

        A walk in format 1 stops right after the ``chain_format`` entry (the
        boundary, at seq 1 in every store made since format 2): the rows
        after it are read again by the fast statement, instead of the rest of
        a batch going through the reference check at several times its cost.
        """
        expected_seq, prev_hash = self._expected(rows[0])
        for row in rows:
            seq, kind, prev, stored_hash = row[0], row[3], row[10], row[11]
            if seq != expected_seq:
                raise Bad(seq, gap_problem(expected_seq, seq))
            if prev != prev_hash:
                raise Bad(seq, link_problem(seq))
            met = self.boundary is None
            if met:
                self._format_1(row)
                met = self.boundary is not None
            else:
                self._format_2(row)
            self.checked += 1
            expected_seq = seq + 1
            prev_hash = self.head_hash = stored_hash
            self.head_seq = seq
            if met:
                return seq
        return rows[-1][0]

    def walk_fast(self, rows: list[tuple[Any, ...]]) -> None:
        """Format-2 rows from the fast statement; the hot loop, spelt out by hand (see the module docstring).

        The hashed text is ``prev_hash`` + ``{"body":`` + the stored body +
        the rest of the object, which the canonical encoder writes as its
        keys in order, ``null`` for None, ``int.__repr__`` for the seq and
        :func:`json.encoder.encode_basestring` of each string (the C encoder
        calls that very function). The loop writes the rest the same way,
        only cheaper where that provably gives the same characters:

        - a string seen before in a repeating column (kind, principal, team,
          model, policy revision) takes its quoted form from
          :attr:`quoted`, which holds ``encode_basestring(v)`` for exact
          ``str`` keys only (no other type ever equals a ``str``);
        - a value equal to a SHA-256 hex digest this process computed (the
          ``prev_hash`` of any row after the walk's first: it equals the
          previous entry's hash, checked against its recomputation; the
          ``payload_digest`` when it equals its payload's digest) is
          written as ``"`` + value + ``"``, which is what
          ``encode_basestring`` writes for hex digits;
        - a ``terminal_request_id`` equal to the row's ``request_id`` reuses
          that one's quoted form.

        Anything the encoder would refuse or write otherwise (a value that
        is not a string, a timestamp not in the store's form, a body not
        stored as text) raises here or fails the form check, and the row
        goes to the reference check. The payload's digest is computed
        first, but a hash mismatch is still reported before a payload one.
        """
        expected_seq, prev_hash = self._expected(rows[0])
        hex_prev = self.head_seq is not None  # the first row's prev_hash is taken on trust, not computed here
        sha256, pad, quote = _sha256, self.pad_fraction, encode_basestring
        known, learn = self.quoted.get, self._quote
        boundary = self.boundary
        checked = self.checked
        head_seq, head_hash = self.head_seq, self.head_hash
        try:
            for row in rows:
                (seq, created_at, request_id, kind, principal, team, model, body, policy_revision,
                 terminal_request_id, prev, stored_hash, payload, digest) = row
                if seq != expected_seq:
                    raise Bad(seq, gap_problem(expected_seq, seq))
                if prev != prev_hash:
                    raise Bad(seq, link_problem(seq))
                if pad and type(created_at) is str and len(created_at) != 26:
                    created_at = _padded(created_at)
                data = pay = None
                try:  # TypeError: not a string where the store writes one; such a row goes to the reference
                    if payload is not None:
                        pay = sha256(payload if type(payload) is bytes else payload.encode()).hexdigest()
                    if len(created_at) == 26 and created_at[10] == " ":
                        rid = quote(request_id)
                        tid = ("null" if terminal_request_id is None else
                               rid if terminal_request_id == request_id else quote(terminal_request_id))
                        dig = "null" if digest is None else f'"{digest}"' if pay == digest else quote(digest)
                        pv = f'"{prev}"' if hex_prev else quote(prev)
                        rev = "null" if policy_revision is None else known(policy_revision) or learn(policy_revision)
                        rest = (f',"created_at":{quote(f"{created_at[:10]}T{created_at[11:]}+00:00")},'
                                f'"kind":{known(kind) or learn(kind)},'
                                f'"model":{"null" if model is None else known(model) or learn(model)},'
                                f'"payload_digest":{dig},"policy_revision":{rev},"prev_hash":{pv},'
                                f'"principal":{"null" if principal is None else known(principal) or learn(principal)},'
                                f'"request_id":{rid},"seq":{seq:d},'
                                f'"team":{"null" if team is None else known(team) or learn(team)},'
                                f'"terminal_request_id":{tid}}}')
                        data = b"".join(((prev + '{"body":').encode(),
                                         body if type(body) is bytes else body.encode(), rest.encode()))
                except (TypeError, ValueError, AttributeError):
                    data = None
                if data is None:  # not what the store writes: the reference check decides
                    self._reference(seq)
                else:
                    computed = sha256(data).hexdigest()
                    if computed != stored_hash:
                        raise Bad(seq, self._v2_mismatch(seq, stored_hash, computed))
                    if payload is not None and pay != digest:
                        _check_payload(seq, payload, digest)  # raises, with the message
                    if kind == CHAIN_FORMAT:
                        raise Bad(seq, _second_boundary(seq, boundary))
                checked += 1
                expected_seq = seq + 1
                prev_hash = head_hash = stored_hash
                head_seq = seq
                hex_prev = True  # stored_hash equalled the hash recomputed for it
        finally:
            self.checked, self.head_seq, self.head_hash = checked, head_seq, head_hash

    def _quote(self, value: Any) -> str:
        """``encode_basestring(value)`` (TypeError for anything but a string), kept for a ``str`` seen again."""
        quoted = encode_basestring(value)
        if type(value) is str and len(self.quoted) < _QUOTED_MAX:
            self.quoted[value] = quoted
        return quoted

    def _reference(self, seq: int) -> None:
        """Check one format-2 row as the reference statement reads it (raises :class:`Bad`)."""
        row = self.one(seq)
        if row is None:  # gone since the fast read: it was deleted under the walk
            raise Bad(seq, f"entry {seq} disappeared while it was being verified (it was deleted)")
        self._format_2(row)

    def _format_2(self, row: tuple[Any, ...]) -> None:
        seq, kind, stored_hash, payload, digest = row[0], row[3], row[11], row[12], row[13]
        computed = _sha256(self._v2_text(row).encode("utf-8")).hexdigest()
        if computed != stored_hash:
            raise Bad(seq, self._v2_mismatch(seq, stored_hash, computed, row))
        if payload is not None:
            _check_payload(seq, payload, digest)
        if kind == CHAIN_FORMAT:
            raise Bad(seq, _second_boundary(seq, self.boundary))

    def _v2_text(self, row: tuple[Any, ...]) -> str:
        """``prev_hash`` and the format-2 canonical text of a reference row, through the canonical encoder."""
        (seq, created_at, request_id, kind, principal, team, model, body, policy_revision,
         terminal_request_id, prev, _hash, _payload, digest) = row
        if type(created_at) is str and len(created_at) == 26 and created_at[10] == " ":
            moment = f"{created_at[:10]}T{created_at[11:]}+00:00"  # SQLite's stored form, as hashed
        else:
            moment = self._timestamp(seq, created_at)
        if type(body) is not str:
            raise Bad(seq, f"audit entry {seq} cannot be decoded: its body is not stored as text "
                           "(the entry was edited)")
        try:
            rest = _ENCODER.encode({
                "created_at": moment, "kind": kind, "model": model, "payload_digest": digest,
                "policy_revision": policy_revision, "prev_hash": prev, "principal": principal,
                "request_id": request_id, "seq": seq, "team": team, "terminal_request_id": terminal_request_id})
        except (TypeError, ValueError) as exc:
            raise Bad(seq, f"audit entry {seq} cannot be decoded: {exc} (the entry was edited)") from None
        return f'{prev}{{"body":{body},{rest[1:]}'

    def _timestamp(self, seq: int, value: Any) -> str:
        """The hashed form of a ``created_at`` that is not SQLite's usual text (PostgreSQL's datetime)."""
        if isinstance(value, datetime):
            return format_timestamp(self.created_at(value))
        shown = f" {value[:40]!r}" if isinstance(value, str) else ""  # e.g. PostgreSQL's 'infinity'
        raise Bad(seq, f"audit entry {seq} cannot be decoded: created_at{shown} is not stored in the store's "
                       "form (the entry was edited)")

    def _v2_mismatch(self, seq: int, stored_hash: str, computed: str, row: tuple[Any, ...] | None = None) -> str:
        problem = (f"hash mismatch: entry {seq} stores {stored_hash[:16]}… but its stored content hashes "
                   f"to {computed[:16]}… (the entry was edited, or its body is not the canonical text)")
        try:  # a format-1 hash after the boundary: written by a process still running the old code
            row = row if row is not None else self.one(seq)
            if row is not None and row[13] is None and self._v1_hash(row) == stored_hash:
                problem = (f"format mismatch: entry {seq} is hashed in format 1 but comes after the "
                           f"chain_format boundary at {self.boundary} (written by an old process?)")
        except Exception:  # noqa: BLE001 - only the wording is at stake here; the verdict stands
            pass
        return problem

    def _v1_hash(self, row: tuple[Any, ...]) -> str:
        seq = row[0]
        try:
            fields = dict(zip(NAMES, row))
            fields["body"] = json.loads(fields["body"])
            fields["created_at"] = self.created_at(fields["created_at"])
            return entry_hash({name: fields[name] for name in HASHED_FIELDS}, format=FORMAT_1)
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # AttributeError: a timestamp read as text
            raise Bad(seq, f"audit entry {seq} cannot be decoded: {exc} (the entry was edited)") from None

    def _format_1(self, row: tuple[Any, ...]) -> None:
        """An entry up to the boundary: parse and re-serialise, as format 1 always did."""
        seq, kind, body, stored_hash = row[0], row[3], row[7], row[11]
        recomputed = self._v1_hash(row)
        if recomputed != stored_hash:
            raise Bad(seq, f"hash mismatch: entry {seq} stores {stored_hash[:16]}… but its content "
                           f"hashes to {recomputed[:16]}… (the entry was edited)")
        if row[12] is not None or row[13] is not None:
            raise Bad(seq, f"entry {seq} is format 1 (before the chain_format boundary) but carries a "
                           "payload or payload_digest, which format 1 does not chain (added after the fact)")
        if kind == CHAIN_FORMAT:
            if row[2] != CHAIN_FORMAT_REQUEST_ID or json.loads(body) != {"format": FORMAT_2}:
                raise Bad(seq, f"entry {seq} is a chain_format entry for an unknown format")
            self.boundary = seq


def _padded(moment: str) -> str | None:
    """PostgreSQL's text form of a UTC timestamp with the fraction's 6 digits back; None if it is another form."""
    size = len(moment)
    if size == 19:
        return moment + ".000000"
    if 21 <= size < 26 and moment[19] == ".":
        return moment + "0" * (26 - size)
    return None


def _check_payload(seq: int, payload: Any, digest: str | None) -> None:
    if digest is None:
        raise Bad(seq, f"entry {seq} has a payload but no payload_digest: the payload was added "
                       "after the fact (the entry was edited)")
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    if _sha256(data).hexdigest() != digest:
        raise Bad(seq, f"payload mismatch: the stored payload of entry {seq} does not match its "
                       "chained payload_digest (the payload was edited)")


def _second_boundary(seq: int, boundary: int | None) -> str:
    return (f"entry {seq} is a second chain_format entry after the boundary at "
            f"{boundary} (the chain was tampered with)")
