"""Recompute the hash chain and report the first entry that does not fit.

Read-only and streaming, apart from the store so a reviewer can verify
without write access. What each check catches, and what it cannot (a cut-off
tail): docs/architecture.md, "Audit entries and the chain".
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from .chain import GENESIS_HASH
from .errors import CorruptEntryError
from .store import AuditStore


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify_chain`.

    ``checked`` counts entries found sound before the first bad one (all of
    them when ``ok``). ``head_hash`` is the hash of the last sound entry,
    what a checkpoint would sign.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: str | None
    head_hash: str | None = None


def verify_chain(source: AuditStore | Engine, *, batch: int = 1000) -> VerifyResult:
    """Check every entry in seq order; stop at the first problem.

    Raises :class:`audit.AuditError` if the database cannot be read at all
    (that is not a verdict on the chain).
    """
    store = source if isinstance(source, AuditStore) else AuditStore(source)
    expected_seq = 1
    prev_hash = GENESIS_HASH
    checked = 0
    head_hash: str | None = None

    def bad(seq: int, problem: str) -> VerifyResult:
        return VerifyResult(ok=False, checked=checked, first_bad_seq=seq, problem=problem, head_hash=head_hash)

    try:
        for entry in store.iter_entries(0, batch):
            if entry.seq != expected_seq:
                return bad(
                    entry.seq,
                    f"seq gap: expected entry {expected_seq}, found {entry.seq}; "
                    f"entries {expected_seq}..{entry.seq - 1} are missing (deleted)",
                )
            if entry.prev_hash != prev_hash:
                what = "the genesis hash" if entry.seq == 1 else f"the hash of entry {entry.seq - 1}"
                return bad(
                    entry.seq,
                    f"prev_hash mismatch: entry {entry.seq} does not link to {what} "
                    "(an entry was removed, reordered or replaced before it)",
                )
            recomputed = entry.expected_hash()
            if entry.hash != recomputed:
                return bad(
                    entry.seq,
                    f"hash mismatch: entry {entry.seq} stores {entry.hash[:16]}… but its content "
                    f"hashes to {recomputed[:16]}… (the entry was edited)",
                )
            checked += 1
            expected_seq += 1
            prev_hash = head_hash = entry.hash
    except CorruptEntryError as exc:
        return bad(exc.seq if exc.seq is not None else expected_seq, f"{exc} (the entry was edited)")
    return VerifyResult(ok=True, checked=checked, first_bad_seq=None, problem=None, head_hash=head_hash)
