"""Hold the chain against its signed checkpoints: what ``govgate audit verify`` adds to the hash check.

The hash check (:mod:`audit.verify`) proves each stored entry links to the
one before and that its hash is its content's. It cannot see entries cut off
the end, nor a chain rewritten from some entry on with fresh hashes. Here:

* every stored checkpoint must be signed by the trusted key and name the
  stored hash of the entry it covers (rewriting or truncating below a
  checkpoint breaks that);
* an external checkpoint file, kept elsewhere, likewise (it survives the
  deletion of the stored checkpoints: truncation below it is caught);
* entries after the latest checkpoint are the *unsigned tail*, reported
  always and a failure when ``strict``, when they follow a *closing*
  checkpoint (written at a stop, clean or forced, or by ``audit export``
  signing its own read while no gateway runs), when one is dated in the future,
  or when the oldest is older than ``max_unsigned_age_s``;
* the checkpoint a gateway on this host last vouched for
  (:mod:`audit.checkpoint_memory`), when given, must still be stored and its
  entry still hold its hash;
* ``chain_anomaly`` entries (a gateway found, at start, entries nobody
  signed, or the checkpoint it remembered gone) are listed.

Rules and their reasons: docs/architecture.md, "Checkpoints".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from .checkpoints import Checkpoint, CheckpointRowError, CheckpointStore
from .chain import format_timestamp
from .kinds import CHAIN_ANOMALY
from .signing import PublicKey

#: A tail after a closing checkpoint younger than this is a gateway that started since and has
#: not signed yet (it signs the first entry after a closing checkpoint within a second).
CLOSING_GRACE_S: Final = 5.0
#: Clock difference between hosts tolerated before an entry counts as dated in the future.
FUTURE_SKEW_S: Final = 60.0
#: Problems listed one by one before the rest are counted.
MAX_LISTED: Final = 20

def default_max_unsigned_age_s(interval_s: float) -> float:
    """Twice the checkpoint interval and 30 s: a running gateway signs well within it."""
    return 2 * interval_s + 30.0


@dataclass(frozen=True, slots=True)
class UnsignedTail:
    """Entries after the latest checkpoint (all of them when there is none)."""

    first_seq: int
    last_seq: int
    oldest_at: datetime
    newest_at: datetime
    after: Checkpoint | None

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass
class CheckpointVerdict:
    """What :func:`check_checkpoints` found. ``ok`` is False on any sign of tampering (``problems``)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0
    latest: Checkpoint | None = None
    tail: UnsignedTail | None = None
    anomalies: list[str] = field(default_factory=list)
    #: Set when the unsigned tail is a problem (:func:`_judge_tail`): see :attr:`only_unsigned_tail`.
    tail_problem: bool = False
    _unlisted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def only_unsigned_tail(self) -> bool:
        """The one problem is entries nobody signed: not proof of tampering (a gateway killed before its closing
        checkpoint leaves them so until its next start), nor vouched for (entries added while no gateway ran
        look the same). Every other problem is a signature or a signed hash that does not hold."""
        return self.tail_problem and len(self.problems) == 1

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(text)
        else:
            self._unlisted += 1
            if self._unlisted == 1:
                self.problems.append("… and more problems (only the first are listed)")


def unsigned_tail(store: CheckpointStore, latest: Checkpoint | None, *,
                  through: int | None = None) -> UnsignedTail | None:
    """The entries after ``latest`` (all of them when None; up to ``through`` when given), summarised; None when
    there are none."""
    found = store.entries_after(latest.seq if latest else 0, through=through)
    if found is None:
        return None
    first, last, oldest, newest = found
    return UnsignedTail(first_seq=first, last_seq=last, oldest_at=oldest, newest_at=newest, after=latest)


#: The problem of a checkpoint checked without a key: nothing vouches for it (no sign of tampering either).
NO_KEY_PROBLEM = "no trusted public key to check its signature"


def check_checkpoints(store: CheckpointStore, public_key: PublicKey | None, *, external: Checkpoint | None = None,
                      remembered: Checkpoint | None = None, strict: bool = False, max_unsigned_age_s: float,
                      now: datetime | None = None) -> CheckpointVerdict:
    """Check the stored checkpoints, ``external``, ``remembered`` and the unsigned tail; see the module docstring.

    ``public_key`` is the only key trusted; without one, any checkpoint is a
    problem (nothing can vouch for it). Raises :class:`AuditError` when the
    database cannot be read at all (not a verdict).
    """
    now = now or datetime.now(timezone.utc)
    verdict = CheckpointVerdict()
    if public_key is None:
        verdict.notes.append("no public key: no signature can be checked")
    try:
        for checkpoint, entry_hash in store.with_entry_hashes():
            verdict.checked += 1
            verdict.latest = checkpoint
            _check_one(verdict, checkpoint, entry_hash, public_key, "stored checkpoint")
        for mark, entry_hash in store.closing_marks():  # a stop over a head already signed: its closing checkpoint
            verdict.checked += 1
            _check_one(verdict, mark, entry_hash, public_key, "closing mark")
            if verdict.latest is not None and mark.seq == verdict.latest.seq:
                verdict.latest = mark  # the tail after it was written while no gateway ran
    except CheckpointRowError as exc:
        verdict.problem(f"stored checkpoints cannot be read: {exc}")
    if external is not None:
        stored = store.entry_hash(external.seq)
        _check_one(verdict, external, stored, public_key, "checkpoint file")
    if remembered is not None:
        _check_signature(verdict, remembered, public_key, "checkpoint memory")
        problem = remembered_problem(store, remembered)
        if problem is not None:
            verdict.problem(f"checkpoint memory (what a gateway on this host last vouched for): {problem}")
    tail = unsigned_tail(store, verdict.latest)
    verdict.tail = tail
    if tail is not None:
        _judge_tail(verdict, tail, strict=strict, max_unsigned_age_s=max_unsigned_age_s, now=now)
    verdict.anomalies = anomaly_descriptions(store)
    return verdict


def _check_one(verdict: CheckpointVerdict, checkpoint: Checkpoint, entry_hash: str | None,
               public_key: PublicKey | None, what: str) -> None:
    _check_signature(verdict, checkpoint, public_key, what)
    if entry_hash is None:
        verdict.problem(f"{what} at seq {checkpoint.seq}: the chain has no entry {checkpoint.seq} "
                        "(entries were cut off or deleted below a signed checkpoint)")
    elif entry_hash != checkpoint.head_hash:
        verdict.problem(f"{what} at seq {checkpoint.seq} signs hash {checkpoint.head_hash[:16]}… but entry "
                        f"{checkpoint.seq} stores {entry_hash[:16]}… (the chain was rewritten at or before it)")


def _check_signature(verdict: CheckpointVerdict, checkpoint: Checkpoint, public_key: PublicKey | None,
                     what: str) -> None:
    if public_key is None:
        verdict.problem(f"{what} at seq {checkpoint.seq}: {NO_KEY_PROBLEM}")
    else:
        problem = checkpoint.signature_problem(public_key)
        if problem is not None:
            verdict.problem(f"{what}: {problem}")


def remembered_problem(store: CheckpointStore, remembered: Checkpoint) -> str | None:
    """Why the database no longer holds ``remembered`` (a checkpoint a gateway vouched for), None if it does.

    Its entry must still hold the hash it signs (else the log was cut back
    or rewritten at or before it), and the checkpoint itself must still be
    stored, as closing as it was (else the checkpoints above some older one
    were deleted, and what follows that one is judged against it alone).
    """
    seq = remembered.seq
    entry_hash = store.entry_hash(seq)
    if entry_hash is None:
        return f"the chain has no entry {seq} any more (the log was cut back below the checkpoint at seq {seq})"
    if entry_hash != remembered.head_hash:
        return (f"entry {seq} stores {entry_hash[:16]}…, not the {remembered.head_hash[:16]}… its checkpoint "
                "signed (the chain was rewritten at or before it)")
    stored = store.at(seq)
    if stored is None or stored.head_hash != remembered.head_hash:
        return f"the checkpoint at seq {seq} is no longer stored (checkpoints were deleted)"
    if remembered.closing and not stored.closing:
        return (f"the closing checkpoint at seq {seq} is no longer stored, only a plain one "
                "(its closing mark was deleted)")
    return None


def _judge_tail(verdict: CheckpointVerdict, tail: UnsignedTail, *, strict: bool, max_unsigned_age_s: float,
                now: datetime) -> None:
    after = f"after checkpoint {tail.after.seq}" if tail.after else "no checkpoint covers them"
    span = f"entries {tail.first_seq}..{tail.last_seq} ({tail.count}), written " \
           f"{format_timestamp(tail.oldest_at)} to {format_timestamp(tail.newest_at)}"
    verdict.notes.append(f"unsigned tail: {span}; {after}")
    age = (now - tail.oldest_at).total_seconds()
    before = len(verdict.problems)
    _tail_problem(verdict, tail, span, age, strict=strict, max_unsigned_age_s=max_unsigned_age_s, now=now)
    verdict.tail_problem = len(verdict.problems) > before


def _tail_problem(verdict: CheckpointVerdict, tail: UnsignedTail, span: str, age: float, *, strict: bool,
                  max_unsigned_age_s: float, now: datetime) -> None:
    if strict:
        verdict.problem(f"unsigned tail ({span}) and --strict: every entry must be covered by a checkpoint")
    elif tail.newest_at > now + timedelta(seconds=FUTURE_SKEW_S):
        verdict.problem(f"unsigned tail ({span}): an entry is dated in the future")
    elif tail.after is not None and tail.after.closing and age > CLOSING_GRACE_S:
        verdict.problem(f"unsigned tail ({span}) after the closing checkpoint {tail.after.seq}, written at a "
                        "gateway's stop: these entries were written while no gateway ran")
    elif age > max_unsigned_age_s:
        verdict.problem(f"unsigned tail ({span}): unsigned for {age:.0f} s, longer than the "
                        f"{max_unsigned_age_s:.0f} s a running gateway takes to sign")


# -- chain_anomaly entries ----------------------------------------------------------


def closing_tail_judged_at(store: CheckpointStore, *, now: datetime) -> datetime | None:
    """When entries after a closing checkpoint are too young to judge, the time they can be; else None.

    In a rolling restart a replica stopping writes its closing checkpoint
    (or closing mark) while another replica still runs: what that one
    appends next is unsigned after a closing checkpoint until its next
    look, within a second, signs it. A replica starting in that second
    would name those entries in a (false) ``chain_anomaly``; it waits until
    the tail's oldest entry is :data:`CLOSING_GRACE_S` old (the grace
    ``verify`` gives the same tail) and judges then: by that time a running
    replica has signed them, and what is still unsigned was written while
    no gateway ran.
    """
    latest = store.latest()
    if latest is None or not latest.closing:
        return None
    tail = unsigned_tail(store, latest)
    if tail is None:
        return None
    judged_at = tail.oldest_at + timedelta(seconds=CLOSING_GRACE_S)
    return judged_at if judged_at > now else None


def anomaly_at_start(store: CheckpointStore, *, max_unsigned_age_s: float,
                     through: int | None = None) -> dict[str, Any] | None:
    """The body of a ``chain_anomaly`` entry a starting gateway must append, or None.

    Unsigned entries after the latest checkpoint are an anomaly when that
    checkpoint is a closing one (written at a stop: nothing should
    follow until a gateway starts again, and none has yet signed), or when
    some were written more than ``max_unsigned_age_s`` after it (no gateway
    signed for that long: a crash, or writes while it was down). A range a
    ``chain_anomaly`` entry in the tail already names (a replica starting at
    the same time) is not named twice. ``through``: the head when the
    gateway started (entries after it are its own, when it judged late:
    :func:`closing_tail_judged_at`).
    """
    latest = store.latest()
    if latest is None:
        return None
    tail = unsigned_tail(store, latest, through=through)
    if tail is None:
        return None
    if latest.closing:
        why = "after_closing"
    elif tail.newest_at > latest.created_at + timedelta(seconds=max_unsigned_age_s):
        why = "unsigned_too_long"
    else:
        return None
    for _seq, _at, body in store.entries_of_kind(CHAIN_ANOMALY, after_seq=latest.seq):
        if isinstance(body, dict) and body.get("first_seq") == tail.first_seq:
            return None
    return {"reason": why, "first_seq": tail.first_seq, "last_seq": tail.last_seq, "after_checkpoint": latest.seq,
            "checkpoint_closing": latest.closing, "checkpoint_created_at": format_timestamp(latest.created_at),
            "oldest_created_at": format_timestamp(tail.oldest_at),
            "newest_created_at": format_timestamp(tail.newest_at)}


#: The ``reason`` of a ``chain_anomaly`` a start records when the checkpoint its host remembered is gone.
GONE: Final = "vouched_checkpoint_gone"


def gone_anomaly(store: CheckpointStore, remembered: Checkpoint, problem: str) -> dict[str, Any] | None:
    """The body of the ``chain_anomaly`` a starting gateway appends when the checkpoint its host remembered
    (:mod:`audit.checkpoint_memory`) is gone (``problem``: :func:`remembered_problem`); None when an entry on
    the chain names that checkpoint already (replicas sharing the memory, or a start that failed after it)."""
    for _seq, _at, body in store.entries_of_kind(CHAIN_ANOMALY):
        if (isinstance(body, dict) and body.get("reason") == GONE and body.get("checkpoint_seq") == remembered.seq
                and body.get("checkpoint_head_hash") == remembered.head_hash):
            return None
    latest = store.latest()
    return {"reason": GONE, "checkpoint_seq": remembered.seq, "checkpoint_head_hash": remembered.head_hash,
            "checkpoint_created_at": format_timestamp(remembered.created_at),
            "checkpoint_closing": remembered.closing, "problem": problem,
            "latest_checkpoint": latest.seq if latest else None}


def anomaly_request_id(body: dict[str, Any]) -> str:
    if body.get("reason") == GONE:
        return f"chain-anomaly-checkpoint-{body['checkpoint_seq']}-gone"
    return f"chain-anomaly-{body['first_seq']}-{body['last_seq']}"


def anomaly_descriptions(store: CheckpointStore) -> list[str]:
    """One line per ``chain_anomaly`` entry on the chain, oldest first."""
    lines = []
    for seq, at, body in store.entries_of_kind(CHAIN_ANOMALY):
        if not isinstance(body, dict):
            lines.append(f"entry {seq} ({format_timestamp(at)}): chain_anomaly with an unreadable body")
            continue
        if body.get("reason") == GONE:
            lines.append(f"entry {seq} ({format_timestamp(at)}): the checkpoint at seq {body.get('checkpoint_seq')} "
                         f"(signed {body.get('checkpoint_created_at')}) that a gateway had vouched for was gone at "
                         f"this start: {body.get('problem')}; the database was restored from an older copy, "
                         "or rewritten")
            continue
        reason = {"after_closing": "written after the closing checkpoint",
                  "unsigned_too_long": "left unsigned for longer than the max age after checkpoint"}.get(
                      body.get("reason"), str(body.get("reason")))
        lines.append(f"entry {seq} ({format_timestamp(at)}): entries {body.get('first_seq')}..{body.get('last_seq')} "
                     f"were {reason} {body.get('after_checkpoint')} and signed by nobody until this restart")
    return lines
