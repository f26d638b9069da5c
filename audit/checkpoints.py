"""Signed checkpoints of the chain's head: made, stored, written to a file, read back.

A checkpoint says "entry ``seq`` had hash ``head_hash``" under an Ed25519
signature (:mod:`audit.signing`). The chain alone cannot show that entries
were cut off its end, or that it was rewritten from some entry on with fresh
hashes; a checkpoint can, as long as the signing key was not used by the
forger. What is checked against them is in :mod:`audit.checkpoint_check`;
the format: docs/architecture.md, "Checkpoints".
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Final, Iterator

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DataError

from .chain import canonical_json, canonical_text, format_timestamp
from .db import DB_ERRORS, describe, reason
from .errors import AuditError
from .signing import PublicKey, SigningKey
from .tables import audit_table, checkpoint_table, closing_mark_table

#: The ``format`` of the signed message; a verifier refuses any other.
FORMAT: Final = "govgate-checkpoint/1"

_cp = checkpoint_table
_marks = closing_mark_table
_entries = audit_table


class CheckpointFileError(AuditError):
    """A checkpoint file that cannot be read or does not hold a checkpoint."""


class CheckpointRowError(AuditError):
    """A stored checkpoint (or entry) row that no longer decodes: tampering or corruption, a verdict."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One signed checkpoint. ``created_at`` is aware UTC; ``signature`` is hex."""

    seq: int
    head_hash: str
    created_at: datetime
    closing: bool
    key_id: str
    signature: str

    def signed_fields(self) -> dict[str, Any]:
        """Exactly what is signed (before canonical JSON)."""
        return {"format": FORMAT, "seq": self.seq, "head_hash": self.head_hash,
                "created_at": format_timestamp(self.created_at), "closing": self.closing, "key_id": self.key_id}

    def message(self) -> bytes:
        """The signed bytes: canonical JSON of :meth:`signed_fields`."""
        return canonical_json(self.signed_fields())

    def signature_problem(self, public_key: PublicKey) -> str | None:
        """Why this checkpoint is not ``public_key``'s signature of its fields, or None when it is."""
        if self.key_id != public_key.key_id:
            return (f"checkpoint at seq {self.seq} names signing key {self.key_id[:16]}…, "
                    f"not the trusted key {public_key.key_id[:16]}… (signed by another key)")
        if not public_key.verifies(self.message(), self.signature):
            return (f"checkpoint at seq {self.seq}: the signature does not verify "
                    "(the checkpoint was edited or forged)")
        return None

    def to_document(self, public_key: PublicKey) -> dict[str, Any]:
        """The checkpoint file's object: the signed fields, ``signature`` and the signer's raw key in hex."""
        return {**self.signed_fields(), "signature": self.signature, "public_key": public_key.hex}

    @classmethod
    def from_document(cls, doc: Any) -> "Checkpoint":
        """Parse a checkpoint file's object; :class:`CheckpointFileError` if it is not one."""
        if not isinstance(doc, dict):
            raise CheckpointFileError("a checkpoint is a JSON object")
        if doc.get("format") != FORMAT:
            raise CheckpointFileError(f"not a checkpoint of format {FORMAT!r}: {doc.get('format')!r}")
        try:
            seq, head_hash, closing = doc["seq"], doc["head_hash"], doc["closing"]
            key, signature, created = doc["key_id"], doc["signature"], doc["created_at"]
        except KeyError as exc:
            raise CheckpointFileError(f"checkpoint lacks {exc.args[0]!r}") from None
        if type(seq) is not int or not 1 <= seq <= MAX_SEQ or type(closing) is not bool:  # a seq past a database's
            # integers crashed verify's look-up (probe s59 F7)
            raise CheckpointFileError(f"checkpoint 'seq' must be an integer from 1 to {MAX_SEQ} and 'closing' a "
                                      "boolean")
        if not all(isinstance(v, str) for v in (head_hash, key, signature, created)):
            raise CheckpointFileError("checkpoint 'head_hash', 'key_id', 'signature', 'created_at' must be strings")
        try:
            created_at = datetime.fromisoformat(created)
            if created_at.tzinfo is None or format_timestamp(created_at) != created:
                raise ValueError(created)
        except ValueError:
            raise CheckpointFileError(f"checkpoint 'created_at' is not a UTC timestamp as signed: {created!r}") from None
        return cls(seq=seq, head_hash=head_hash, created_at=created_at, closing=closing, key_id=key,
                   signature=signature)


#: The largest seq a store holds (a signed 64-bit integer, SQLite's and PostgreSQL's ``bigint``).
MAX_SEQ = 2**63 - 1


def sign_checkpoint(key: SigningKey, seq: int, head_hash: str, *, closing: bool = False,
                    created_at: datetime | None = None) -> Checkpoint:
    """Sign (``seq``, ``head_hash``) now (or at ``created_at``, microseconds kept)."""
    moment = (created_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    unsigned = Checkpoint(seq=seq, head_hash=head_hash, created_at=moment, closing=closing, key_id=key.key_id,
                          signature="")
    return Checkpoint(seq=seq, head_hash=head_hash, created_at=moment, closing=closing, key_id=key.key_id,
                      signature=key.sign(unsigned.message()))


# -- files -------------------------------------------------------------------


def checkpoint_file_text(checkpoint: Checkpoint, public_key: PublicKey) -> str:
    """The file's text: canonical JSON and a newline (what GOVGATE_CHECKPOINT_COMMAND reads on stdin)."""
    return canonical_text(checkpoint.to_document(public_key)) + "\n"


def write_checkpoint_file(path: Path, checkpoint: Checkpoint, public_key: PublicKey) -> None:
    """Write the file atomically (a temporary file renamed into place), so a reader never sees half of it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(checkpoint_file_text(checkpoint, public_key))
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CheckpointFileError(f"cannot write checkpoint file {path}: {exc.strerror or exc}") from None


def read_checkpoint_file(path: Path) -> tuple[Checkpoint, str | None]:
    """The checkpoint in ``path`` and the public key (hex) it names; the key is NOT trusted for that."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointFileError(f"cannot read checkpoint file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CheckpointFileError(f"checkpoint file {path} is not JSON: {exc}") from None
    checkpoint = Checkpoint.from_document(doc)
    named = doc.get("public_key")
    return checkpoint, named if isinstance(named, str) else None


# -- the table ---------------------------------------------------------------


class CheckpointStore:
    """Checkpoints in the audit database (``audit_checkpoints``, append-only)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def head(self) -> tuple[int, str, datetime] | None:
        """The chain's newest entry as (seq, hash, created_at), or None when the chain is empty."""
        stmt = select(_entries.c.seq, _entries.c.hash, _entries.c.created_at).order_by(_entries.c.seq.desc()).limit(1)
        row = self._one(stmt)
        return (row[0], row[1], row[2]) if row else None

    def make(self, key: SigningKey, *, closing: bool = False) -> tuple[Checkpoint, bool] | None:
        """Sign the current head and store it: (the stored checkpoint at that seq, whether this call wrote it).

        None for an empty chain. When a checkpoint of that seq is already
        stored (another replica was first, or nothing was appended since),
        that one is returned and nothing is written: one checkpoint per entry.
        """
        head = self.head()
        if head is None:
            return None
        return self.add(sign_checkpoint(key, head[0], head[1], closing=closing))

    def add(self, checkpoint: Checkpoint) -> tuple[Checkpoint, bool]:
        """Store ``checkpoint`` unless its seq already has one: (the stored one, whether it is this one)."""
        row = {"seq": checkpoint.seq, "head_hash": checkpoint.head_hash, "created_at": checkpoint.created_at,
               "key_id": checkpoint.key_id, "signature": checkpoint.signature, "closing": checkpoint.closing}
        try:
            with self._engine.begin() as conn:
                conn.execute(_cp.insert().values(**row))
            return checkpoint, True
        except DB_ERRORS as exc:
            # A duplicate seq (the key, or the trigger refusing it) is "already checkpointed": not an error.
            try:
                existing = self.get(checkpoint.seq)
            except AuditError:
                existing = None
            if existing is not None:
                if checkpoint.closing and not existing.closing and existing.head_hash == checkpoint.head_hash:
                    return self._add_mark(checkpoint)  # a stop over a head its last tick signed
                return existing, False
            raise AuditError(f"cannot store checkpoint in {describe(self._engine)}: {reason(exc)}") from exc

    def _add_mark(self, checkpoint: Checkpoint) -> tuple[Checkpoint, bool]:
        """Store closing ``checkpoint`` as the closing mark of its seq, whose plain checkpoint is stored already
        (``audit_closing_marks``, :class:`audit.tables.AuditClosingMarkRow`): (the stored mark, whether it is this one)."""
        row = {"seq": checkpoint.seq, "head_hash": checkpoint.head_hash, "created_at": checkpoint.created_at,
               "key_id": checkpoint.key_id, "signature": checkpoint.signature}
        try:
            with self._engine.begin() as conn:
                conn.execute(_marks.insert().values(**row))
            return checkpoint, True
        except DB_ERRORS as exc:
            existing = self._mark(checkpoint.seq)
            if existing is not None:
                return existing, False
            raise AuditError(f"cannot store closing mark in {describe(self._engine)}: {reason(exc)}") from exc

    def _mark(self, seq: int) -> Checkpoint | None:
        """The closing mark of ``seq`` as the closing checkpoint it is, None if there is none."""
        rows = self._fetch(select(_marks).where(_marks.c.seq == seq))
        return _closing_mark(rows[0]) if rows else None

    def closing_marks(self) -> list[tuple[Checkpoint, str | None]]:
        """Every closing mark (one per stop of an idle gateway: few) in seq order, as the closing checkpoint
        it is, with the stored hash of its entry (None: no such entry)."""
        joined = _marks.outerjoin(_entries, _entries.c.seq == _marks.c.seq)
        stmt = select(_marks, _entries.c.hash.label("entry_hash")).select_from(joined).order_by(_marks.c.seq)
        return [(_closing_mark(row), row["entry_hash"]) for row in self._fetch(stmt)]

    def close_over_own(self, key: SigningKey, seq: int, head_hash: str) -> Checkpoint | None:
        """Sign ``seq`` (an entry the caller has just appended) as a closing checkpoint, when it alone follows a
        closing checkpoint whose entry still holds the hash it signed; None (nothing written) otherwise.

        For a command that records an operator's act on the chain while no
        gateway runs (``govgate audit export --include-text``'s
        ``payload_read``): after a closing checkpoint its entry was "signed by
        nobody" and the next start recorded a ``chain_anomaly`` for the
        operator's own read (probe q1). Only the caller's own entry is
        signed, directly after a checkpoint checked here, so nothing anyone
        else wrote is vouched for; with a gateway running (the latest
        checkpoint not closing) its checkpointer signs as usual.
        """
        latest = self.latest()
        if (latest is None or not latest.closing or latest.seq != seq - 1
                or self.entry_hash(latest.seq) != latest.head_hash or self.entry_hash(seq) != head_hash):
            return None
        stored, written = self.add(sign_checkpoint(key, seq, head_hash, closing=True))
        return stored if written else None

    def get(self, seq: int) -> Checkpoint | None:
        rows = self._rows(select(_cp).where(_cp.c.seq == seq))
        return rows[0] if rows else None

    def latest(self) -> Checkpoint | None:
        """The checkpoint of the highest seq: its closing mark when it has one (a stop after the head was signed)."""
        rows = self._rows(select(_cp).order_by(_cp.c.seq.desc()).limit(1))
        return self._marked(rows[0]) if rows else None

    def at(self, seq: int) -> Checkpoint | None:
        """The checkpoint stored for entry ``seq`` (its closing mark when it has one), None if there is none."""
        stored = self.get(seq)
        return self._marked(stored) if stored is not None else None

    def _marked(self, checkpoint: Checkpoint) -> Checkpoint:
        """``checkpoint``, or its seq's closing mark when one signs the same hash."""
        if checkpoint.closing:
            return checkpoint
        mark = self._mark(checkpoint.seq)
        return mark if mark is not None and mark.head_hash == checkpoint.head_hash else checkpoint

    def between(self, first: int, last: int, batch: int = 1000) -> Iterator[Checkpoint]:
        """The checkpoints of entries ``first``..``last`` in seq order, read in batches (constant memory)."""
        after = first - 1
        while True:
            rows = self._rows(select(_cp).where(_cp.c.seq > after, _cp.c.seq <= last).order_by(_cp.c.seq).limit(batch))
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def with_entry_hashes(self, batch: int = 1000) -> Iterator[tuple[Checkpoint, str | None]]:
        """Every checkpoint in seq order with the stored hash of the entry it covers (None: no such entry).

        Keyset-paginated, each batch its own short read: constant memory however many there are.
        """
        last = 0
        joined = _cp.outerjoin(_entries, _entries.c.seq == _cp.c.seq)
        while True:
            stmt = (select(_cp, _entries.c.hash.label("entry_hash")).select_from(joined)
                    .where(_cp.c.seq > last).order_by(_cp.c.seq).limit(batch))
            rows = self._fetch(stmt)
            for row in rows:
                yield _checkpoint(row), row["entry_hash"]
            if len(rows) < batch:
                return
            last = rows[-1]["seq"]

    # -- what the checks need of the entries ---------------------------------

    def entry_hash(self, seq: int) -> str | None:
        """The stored hash of entry ``seq``, None if there is no such entry."""
        row = self._one(select(_entries.c.hash).where(_entries.c.seq == seq))
        return row[0] if row else None

    def entries_after(self, seq: int, *, through: int | None = None) -> tuple[int, int, datetime, datetime] | None:
        """(first seq, last seq, oldest created_at, newest created_at) of the entries after ``seq`` (up to
        ``through`` when given); None if none."""
        stmt = select(func.min(_entries.c.seq), func.max(_entries.c.seq), func.min(_entries.c.created_at),
                      func.max(_entries.c.created_at)).where(_entries.c.seq > seq)
        if through is not None:
            stmt = stmt.where(_entries.c.seq <= through)
        row = self._one(stmt)
        if row is None or row[0] is None:
            return None
        return row[0], row[1], _aware(row[2]), _aware(row[3])

    def entries_of_kind(self, kind: str, *, after_seq: int = 0) -> list[tuple[int, datetime, Any]]:
        """(seq, created_at, body) of every entry of ``kind`` after ``after_seq``, in seq order (a rare kind)."""
        stmt = (select(_entries.c.seq, _entries.c.created_at, _entries.c.body)
                .where(_entries.c.kind == kind, _entries.c.seq > after_seq).order_by(_entries.c.seq))
        return [(row["seq"], row["created_at"], row["body"]) for row in self._fetch(stmt)]

    # -- plumbing ------------------------------------------------------------

    def _fetch(self, stmt: Any) -> list[Any]:
        try:
            with self._engine.connect() as conn:
                result = conn.execute(stmt)
                return list(_decoded(lambda: result.mappings().all(), "a checkpoint row"))
        except DB_ERRORS as exc:
            raise AuditError(f"checkpoint read failed on {describe(self._engine)}: {reason(exc)}") from exc

    def _one(self, stmt: Any) -> Any:
        try:
            with self._engine.connect() as conn:
                result = conn.execute(stmt)
                return _decoded(result.first, "an audit row")
        except DB_ERRORS as exc:
            raise AuditError(f"audit read failed on {describe(self._engine)}: {reason(exc)}") from exc

    def _rows(self, stmt: Any) -> list[Checkpoint]:
        return [_checkpoint(row) for row in self._fetch(stmt)]


def _decoded(fetch: Callable[[], Any], what: str) -> Any:
    """``fetch()``'s rows, or :class:`CheckpointRowError` if a value in them no longer decodes.

    Our own processing raises ValueError/TypeError (a timestamp that no longer
    parses); the driver raises ``DataError`` for a value it cannot load
    (PostgreSQL's ``infinity``). Either is an edited row, a verdict, not a read failure.
    """
    try:
        return fetch()
    except (ValueError, TypeError, DataError) as exc:
        raise CheckpointRowError(f"{what} cannot be decoded (edited?): {reason(exc)}") from exc


def _aware(value: Any) -> datetime:
    """min()/max() of a timestamp come back untyped on SQLite (text): read them as UTCDateTime does."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _closing_mark(row: Any) -> Checkpoint:
    return Checkpoint(seq=row["seq"], head_hash=row["head_hash"], created_at=row["created_at"], closing=True,
                      key_id=row["key_id"], signature=row["signature"])


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(seq=row["seq"], head_hash=row["head_hash"], created_at=row["created_at"],
                      closing=bool(row["closing"]), key_id=row["key_id"], signature=row["signature"])
