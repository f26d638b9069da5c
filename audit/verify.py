"""Recompute the hash chain and report the first entry that does not fit.

Read-only and streaming, apart from the store so a reviewer can verify
without write access. Each format is applied to its range: entries up to and
including the ``chain_format`` boundary are format 1 (the body parsed and
re-serialised, as it always was), entries after it format 2, checked on the
raw DBAPI rows: the *stored* body text is hashed byte for byte (never
parsed), so a duplicate key or any other non-canonical text breaks the hash,
and a stored payload must match its digest. What each check catches, and
what it cannot (a cut-off tail, without a checkpoint): docs/architecture.md,
"Audit entries and the chain".
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring  # the C quoting of JSONEncoder(ensure_ascii=False)
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Final, Iterator

from sqlalchemy import Engine, Text, bindparam, cast, select
from sqlalchemy.exc import DataError

from .chain import FORMAT_1, FORMAT_2, GENESIS_HASH, HASHED_FIELDS, entry_hash, format_timestamp
from .db import DB_ERRORS, describe, reason
from .dbapi import dbapi_cursor
from .errors import AuditError
from .kinds import CHAIN_FORMAT, CHAIN_FORMAT_REQUEST_ID
from .store import AuditStore
from .tables import audit_table

_t = audit_table.c
#: The columns read, in this order (body and payload as their stored text).
_NAMES: Final = ("seq", "created_at", "request_id", "kind", "principal", "team", "model", "body",
                 "policy_revision", "terminal_request_id", "prev_hash", "hash", "payload", "payload_digest")
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_sha256 = hashlib.sha256


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


class _Bad(Exception):
    def __init__(self, seq: int, problem: str) -> None:
        self.seq, self.problem = seq, problem


class _Reader:
    """Keyset-paginated raw rows of the chain, each batch its own short read."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        text_cols = {"body", "payload"}
        # PostgreSQL's driver would parse JSON; its ::text is the stored text exactly (JSON, not JSONB).
        columns = [cast(_t[n], Text) if n in text_cols and dialect.name == "postgresql" else _t[n] for n in _NAMES]
        stmt = select(*columns).where(_t.seq > bindparam("after")).order_by(_t.seq)
        self._sql = str(stmt.compile(dialect=dialect)) + " LIMIT {limit}"  # the same on both dialects
        self._positional = dialect.positional
        self._engine = engine
        processor = _t.created_at.type.dialect_impl(dialect).result_processor(dialect, None)
        self.created_at: Callable[[Any], datetime] = processor or (lambda value: value)
        self._postgresql = dialect.name == "postgresql"

    def batches(self, batch: int) -> Iterator[list[tuple[Any, ...]]]:
        after = 0
        sql = self._sql.format(limit=int(batch))
        while True:
            params: Any = (after,) if self._positional else {"after": after}
            try:
                rows = self._read(sql, params, lenient=False)
            except DataError:
                if not self._postgresql:
                    raise
                # A timestamp psycopg cannot build (``infinity``, year 10000, BC) fails the whole batch's
                # fetch. Read again with it as its text, it reaches the walk, which names its entry. Only
                # then: the lenient loader is psycopg's Python one, several times slower than its C one.
                rows = self._read(sql, params, lenient=True)
            if rows:
                yield rows
                after = rows[-1][0]
            if len(rows) < batch:
                return

    def _read(self, sql: str, params: Any, *, lenient: bool) -> list[tuple[Any, ...]]:
        with dbapi_cursor(self._engine) as cursor:
            if lenient:
                _keep_bad_timestamps(cursor)
            cursor.execute(sql, params)
            return cursor.fetchall()


_lenient_loader: Any = None


def _keep_bad_timestamps(cursor: Any) -> None:
    """Make this psycopg cursor hand back a ``timestamptz`` Python cannot hold as its text, not raise.

    psycopg raises ``DataError`` for such a value while fetching, for the
    whole batch, and the verdict would be a read failure instead of the
    entry. Set only on the cursor that reads such a batch again: everywhere
    else such a row is an error. The text (never a datetime) is then
    reported by :meth:`_Walk._timestamp` as an edited ``created_at``.
    """
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


def verify_chain(source: AuditStore | Engine, *, batch: int = 5000) -> VerifyResult:
    """Check every entry in seq order; stop at the first problem.

    Raises :class:`audit.AuditError` if the database cannot be read at all
    (that is not a verdict on the chain).
    """
    if batch <= 0:
        raise ValueError("batch must be positive")
    engine = source.engine if isinstance(source, AuditStore) else source
    reader = _Reader(engine)
    state = _Walk(reader.created_at, datetimes=engine.dialect.name == "postgresql")
    try:
        for rows in reader.batches(batch):
            state.walk(rows)
    except _Bad as bad:
        return VerifyResult(ok=False, checked=state.checked, first_bad_seq=bad.seq, problem=bad.problem,
                            head_hash=state.head_hash, head_seq=state.head_seq, format_boundary=state.boundary)
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc
    return VerifyResult(ok=True, checked=state.checked, first_bad_seq=None, problem=None,
                        head_hash=state.head_hash, head_seq=state.head_seq, format_boundary=state.boundary)


class _Walk:
    """The walk's state across batches: the expected seq and link, the format in force."""

    def __init__(self, created_at: Callable[[Any], datetime], *, datetimes: bool) -> None:
        self.created_at = created_at
        #: The driver hands back datetimes (PostgreSQL), so anything else is a value it could not load.
        self.datetimes = datetimes
        self.checked = 0
        self.head_hash: str | None = None
        self.head_seq: int | None = None
        self.boundary: int | None = None

    def walk(self, rows: list[tuple[Any, ...]]) -> None:
        expected_seq = (self.head_seq or 0) + 1
        prev_hash = self.head_hash or GENESIS_HASH
        quote = encode_basestring
        for row in rows:
            (seq, created_at, request_id, kind, principal, team, model, body, policy_revision,
             terminal_request_id, prev, stored_hash, payload, digest) = row
            if seq != expected_seq:
                raise _Bad(seq, f"seq gap: expected entry {expected_seq}, found {seq}; "
                                f"entries {expected_seq}..{seq - 1} are missing (deleted)")
            if prev != prev_hash:
                what = "the genesis hash" if seq == 1 else f"the hash of entry {seq - 1}"
                raise _Bad(seq, f"prev_hash mismatch: entry {seq} does not link to {what} "
                                "(an entry was removed, reordered or replaced before it)")
            if self.boundary is None:
                self._format_1(row)
            else:
                # Format 2, the hot loop: the stored texts are hashed as they are, nothing is parsed. The
                # common case (SQLite's stored timestamp, text columns holding text) is spelt out by hand,
                # as the canonical encoder would write it; anything else goes through the encoder itself.
                text = None
                if type(created_at) is str and len(created_at) == 26 and created_at[10] == " " \
                        and type(body) is str:
                    try:
                        text = (f'{prev}{{"body":{body},"created_at":"{created_at[:10]}T{created_at[11:]}+00:00",'
                                f'"kind":{quote(kind)},"model":{"null" if model is None else quote(model)},'
                                f'"payload_digest":{"null" if digest is None else quote(digest)},'
                                f'"policy_revision":{"null" if policy_revision is None else quote(policy_revision)},'
                                f'"prev_hash":{quote(prev)},'
                                f'"principal":{"null" if principal is None else quote(principal)},'
                                f'"request_id":{quote(request_id)},"seq":{seq},'
                                f'"team":{"null" if team is None else quote(team)},"terminal_request_id":'
                                f'{"null" if terminal_request_id is None else quote(terminal_request_id)}}}')
                    except TypeError:  # a column holding something other than text: the encoder decides
                        text = None
                if text is None:
                    text = self._v2_text(row)
                computed = _sha256(text.encode("utf-8")).hexdigest()
                if computed != stored_hash:
                    raise _Bad(seq, self._v2_mismatch(row, computed))
                if payload is not None:
                    self._check_payload(seq, payload, digest)
                if kind == CHAIN_FORMAT:
                    raise _Bad(seq, f"entry {seq} is a second chain_format entry after the boundary at "
                                    f"{self.boundary} (the chain was tampered with)")
            self.checked += 1
            expected_seq = seq + 1
            prev_hash = self.head_hash = stored_hash
            self.head_seq = seq

    def _v2_text(self, row: tuple[Any, ...]) -> str:
        """``prev_hash`` and the format-2 canonical text of a raw row, through the canonical encoder."""
        (seq, created_at, request_id, kind, principal, team, model, body, policy_revision,
         terminal_request_id, prev, _hash, _payload, digest) = row
        if type(created_at) is str and len(created_at) == 26 and created_at[10] == " ":
            moment = f"{created_at[:10]}T{created_at[11:]}+00:00"  # SQLite's stored form, as hashed
        else:
            moment = self._timestamp(seq, created_at)
        if type(body) is not str:
            raise _Bad(seq, f"audit entry {seq} cannot be decoded: its body is not stored as text "
                            "(the entry was edited)")
        try:
            rest = _ENCODER.encode({
                "created_at": moment, "kind": kind, "model": model, "payload_digest": digest,
                "policy_revision": policy_revision, "prev_hash": prev, "principal": principal,
                "request_id": request_id, "seq": seq, "team": team, "terminal_request_id": terminal_request_id})
        except (TypeError, ValueError) as exc:
            raise _Bad(seq, f"audit entry {seq} cannot be decoded: {exc} (the entry was edited)") from None
        return f'{prev}{{"body":{body},{rest[1:]}'

    def _timestamp(self, seq: int, value: Any) -> str:
        """The hashed form of a ``created_at`` that is not SQLite's usual text (PostgreSQL's datetime)."""
        if isinstance(value, datetime):
            return format_timestamp(self.created_at(value))
        shown = f" {value[:40]!r}" if isinstance(value, str) else ""  # e.g. PostgreSQL's 'infinity'
        raise _Bad(seq, f"audit entry {seq} cannot be decoded: created_at{shown} is not stored in the store's "
                        "form (the entry was edited)")

    def _check_payload(self, seq: int, payload: Any, digest: str | None) -> None:
        if digest is None:
            raise _Bad(seq, f"entry {seq} has a payload but no payload_digest: the payload was added "
                            "after the fact (the entry was edited)")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if _sha256(data).hexdigest() != digest:
            raise _Bad(seq, f"payload mismatch: the stored payload of entry {seq} does not match its "
                            "chained payload_digest (the payload was edited)")

    def _v2_mismatch(self, row: tuple[Any, ...], computed: str) -> str:
        seq, stored_hash = row[0], row[11]
        problem = (f"hash mismatch: entry {seq} stores {stored_hash[:16]}… but its stored content hashes "
                   f"to {computed[:16]}… (the entry was edited, or its body is not the canonical text)")
        try:  # a format-1 hash after the boundary: written by a process still running the old code
            if row[13] is None and self._v1_hash(row) == stored_hash:
                problem = (f"format mismatch: entry {seq} is hashed in format 1 but comes after the "
                           f"chain_format boundary at {self.boundary} (written by an old process?)")
        except _Bad:
            pass
        return problem

    def _v1_hash(self, row: tuple[Any, ...]) -> str:
        seq = row[0]
        try:
            fields = dict(zip(_NAMES, row))
            fields["body"] = json.loads(fields["body"])
            created_at = fields["created_at"]
            fields["created_at"] = self._timestamp(seq, created_at) if self.datetimes else self.created_at(created_at)
            return entry_hash({name: fields[name] for name in HASHED_FIELDS}, format=FORMAT_1)
        except (ValueError, TypeError, RecursionError) as exc:
            raise _Bad(seq, f"audit entry {seq} cannot be decoded: {exc} (the entry was edited)") from None

    def _format_1(self, row: tuple[Any, ...]) -> None:
        """An entry up to the boundary: parse and re-serialise, as format 1 always did."""
        seq, kind, body, stored_hash = row[0], row[3], row[7], row[11]
        recomputed = self._v1_hash(row)
        if recomputed != stored_hash:
            raise _Bad(seq, f"hash mismatch: entry {seq} stores {stored_hash[:16]}… but its content "
                            f"hashes to {recomputed[:16]}… (the entry was edited)")
        if row[12] is not None or row[13] is not None:
            raise _Bad(seq, f"entry {seq} is format 1 (before the chain_format boundary) but carries a "
                            "payload or payload_digest, which format 1 does not chain (added after the fact)")
        if kind == CHAIN_FORMAT:
            if row[2] != CHAIN_FORMAT_REQUEST_ID or json.loads(body) != {"format": FORMAT_2}:
                raise _Bad(seq, f"entry {seq} is a chain_format entry for an unknown format")
            self.boundary = seq
