"""A verifiable audit bundle: a selection of entries an outsider can check without the database.

One JSON Lines file. Line 1 is the header; then every entry of the range in
seq order, each marked ``selected`` or not, and after an entry the signed
checkpoint of it, if there is one. The range runs from the entry before the selection's
start (a witness that it is earlier) to the head at export, where a
checkpoint signs it. What that proves, why unselected entries show their
metadata (never their payload), and the procedure step by step:
docs/architecture.md, "Audit bundles".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Final, Iterable

from sqlalchemy import func, select

from .chain import (FORMAT_1, GENESIS_HASH, canonical_json, canonical_text, document_hash, format_timestamp,
                    hashed_fields, payload_digest)
from .checkpoints import Checkpoint, CheckpointFileError, CheckpointStore
from .db import DB_ERRORS, describe, reason
from .errors import AuditError
from .signing import PublicKey, SigningKey
from .store import AuditStore
from .tables import audit_table

FORMAT: Final = "govgate-audit-bundle/1"

_t = audit_table.c


@dataclass(frozen=True)
class Selection:
    """Which entries are exported: one team's (or everyone's) from a moment on (or from the start)."""

    team: str | None = None
    since: datetime | None = None

    def matches(self, team: Any, created_at: datetime) -> bool:
        return (self.team is None or team == self.team) and (self.since is None or created_at >= self.since)

    def to_document(self) -> dict[str, Any]:
        return {"team": self.team, "since": format_timestamp(self.since) if self.since else None}


@dataclass(frozen=True)
class BundleSummary:
    first_seq: int
    last_seq: int
    selected: int
    checkpoints: int


def write_bundle(store: AuditStore, key: SigningKey, out: IO[str], selection: Selection) -> BundleSummary:
    """Write the bundle for ``selection`` to ``out``, signing the head first if it is not signed yet.

    Streams the entries (constant memory). Raises :class:`AuditError` for an
    empty log or a database failure.
    """
    checkpoints = CheckpointStore(store.engine)
    made = checkpoints.make(key)
    if made is None:
        raise AuditError("the audit log is empty: nothing to export")
    last = made[0].seq
    first = _first_seq(store, selection, last)
    header = {"bundle": FORMAT, "selection": selection.to_document(), "first_seq": first, "last_seq": last,
              "public_key": key.public.hex, "exported_at": format_timestamp(datetime.now(timezone.utc))}
    out.write(canonical_text(header) + "\n")
    count = selected = 0
    signed = checkpoints.between(first, last)
    pending = next(signed, None)
    for entry in store.iter_entries(first - 1):
        if entry.seq > last:
            break
        chosen = selection.matches(entry.team, entry.created_at)
        document = entry.to_document()
        if not chosen:
            document["payload"] = None  # the digest in the hash stands for it
        selected += chosen
        out.write(canonical_text({"entry": document, "selected": chosen}) + "\n")
        while pending is not None and pending.seq <= entry.seq:
            if pending.seq == entry.seq:
                out.write(canonical_text({"checkpoint": pending.to_document(key.public)}) + "\n")
                count += 1
            pending = next(signed, None)
    return BundleSummary(first_seq=first, last_seq=last, selected=selected, checkpoints=count)


def _first_seq(store: AuditStore, selection: Selection, last: int) -> int:
    """The entry before the first one at or after ``since`` (its witness: it is earlier), or 1.

    When nothing is that recent, the signed head itself is the witness.
    """
    if selection.since is None:
        return 1
    stmt = select(func.min(_t.seq)).where(_t.created_at >= selection.since)
    try:
        with store.engine.connect() as conn:
            start = conn.execute(stmt).scalar()
    except DB_ERRORS as exc:
        raise AuditError(f"cannot read the audit log in {describe(store.engine)}: {reason(exc)}") from exc
    return last if start is None or start > last else max(1, start - 1)


# -- verification (needs nothing but this file, the chain module and the public key) -------------


@dataclass
class BundleVerdict:
    problems: list[str] = field(default_factory=list)
    entries: int = 0
    selected: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    signed_at: str | None = None
    #: With a checkpoint kept elsewhere (``verify --export --checkpoint``): True when the bundle holds its entry
    #: and that entry's hash is the one it signs, False when its entry lies outside the bundle (not checked).
    external_checked: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bundle(lines: Iterable[str], public_key: PublicKey, external: Checkpoint | None = None) -> BundleVerdict:
    """Check a bundle; see docs/architecture.md, "Audit bundles", for the steps (the same here).

    ``external``, a checkpoint kept elsewhere, must verify under ``public_key`` and, when the bundle holds its
    entry, sign that entry's hash: the bundle then agrees with a signature its exporter could not replace.
    """
    verdict = BundleVerdict()
    stream = iter(lines)
    try:
        first_line = next(stream)
        header = json.loads(first_line)
    except (StopIteration, ValueError, RecursionError):
        verdict.problems.append("the bundle has no header line")
        return verdict
    try:
        canonical = canonical_text(header) == first_line.removesuffix("\n")
    except ValueError:
        canonical = False
    if not canonical:
        verdict.problems.append("the header line is not canonical JSON as exported (a duplicate key, other spacing "
                                "or escapes): readers may not see the selection that was checked")
        return verdict
    if not isinstance(header, dict) or header.get("bundle") != FORMAT:
        verdict.problems.append(f"not a {FORMAT} bundle")
        return verdict
    if set(header) != _HEADER_KEYS:
        verdict.problems.append(f"the bundle header has other fields than a bundle's ({_keys_differ(header, _HEADER_KEYS)})")
        return verdict
    try:
        selection = _selection(header["selection"])
        first, last = header["first_seq"], header["last_seq"]
        if type(first) is not int or type(last) is not int or not 1 <= first <= last:
            raise ValueError("first_seq/last_seq")
        if selection.since is None and first != 1:
            raise ValueError("a selection without 'since' starts at entry 1")
    except (KeyError, TypeError, ValueError) as exc:
        verdict.problems.append(f"the bundle header is malformed ({exc})")
        return verdict
    verdict.first_seq, verdict.last_seq = first, last
    expected_seq, prev_hash, prev_at = first, None, None
    last_signed: Checkpoint | None = None
    external_hash: str | None = None  # the bundle's entry at ``external.seq``, when it holds that entry
    #: Selected entries that chain a payload but carry none, and the ranges the bundle's prunes erased.
    without_payload: list[int] = []
    erased: list[tuple[int, int]] = []
    after_checkpoint = False  # the line before was a checkpoint: a second one for the same entry is a copy
    for number, line in enumerate(stream, start=2):
        if line.endswith("\r\n") or "\r" in line.removesuffix("\n"):
            verdict.problems.append(f"line {number} ends with a carriage return: not a line as exported")
            return verdict
        try:
            item = json.loads(line)
            canonical = canonical_text(item) == line.removesuffix("\n")
        except (ValueError, RecursionError):
            verdict.problems.append(f"line {number} is not JSON")
            return verdict
        if not canonical:  # e.g. a duplicate key: another reader would see another value than the one checked
            verdict.problems.append(f"line {number} is not canonical JSON as exported (a duplicate key, other "
                                    "spacing or escapes): readers may not see what was checked")
            return verdict
        # Every line holds exactly the fields the exporter writes: content beside them is covered by no
        # hash or signature, yet a reader of the bundle would take it for part of it (probe s59 F6).
        shape = _line_shape_problem(item)
        if shape is not None:
            verdict.problems.append(f"line {number}: {shape}")
            return verdict
        if isinstance(item, dict) and "checkpoint" in item:
            if after_checkpoint:
                verdict.problems.append(f"line {number}: a second checkpoint line for the same entry")
                return verdict
            try:
                checkpoint = Checkpoint.from_document(item["checkpoint"])
            except CheckpointFileError as exc:
                verdict.problems.append(f"line {number}: {exc}")
                return verdict
            problem = checkpoint.signature_problem(public_key)
            if problem is None and (checkpoint.seq != expected_seq - 1 or checkpoint.head_hash != prev_hash):
                problem = f"the checkpoint of entry {checkpoint.seq} does not sign the entry before it"
            if problem is not None:
                verdict.problems.append(f"line {number}: {problem}")
                return verdict
            last_signed = checkpoint
            after_checkpoint = True
            continue
        after_checkpoint = False
        document, chosen = (item.get("entry"), item.get("selected")) if isinstance(item, dict) else (None, None)
        if not isinstance(document, dict) or type(chosen) is not bool:
            verdict.problems.append(f"line {number} is neither a checkpoint nor an entry")
            return verdict
        problem = _entry_problem(document, chosen, expected_seq, prev_hash, prev_at, first, selection)
        if problem is not None:
            verdict.problems.append(f"line {number}: {problem}")
            return verdict
        verdict.entries += 1
        verdict.selected += chosen
        if chosen and document.get("payload") is None and document.get("payload_digest") is not None:
            without_payload.append(expected_seq)
        span = _erased_span(document)
        if span is not None:
            erased.append(span)
        prev_hash, prev_at = document["hash"], document["created_at"]
        if external is not None and expected_seq == external.seq:
            external_hash = prev_hash
        expected_seq += 1
    if expected_seq != last + 1:
        verdict.problems.append(f"the bundle ends at entry {expected_seq - 1}, its header says {last}")
    elif last_signed is None or last_signed.seq != last:
        verdict.problems.append(f"no checkpoint signs the last entry {last}: the range is not anchored")
    else:
        verdict.signed_at = format_timestamp(last_signed.created_at)
    dropped = [seq for seq in without_payload if not any(low <= seq <= high for low, high in erased)]
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", …" if len(dropped) > 10 else "")
        verdict.problems.append(f"{len(dropped)} selected entries chain a payload but carry none, and no "
                                f"payloads_erased entry of the bundle erased them (entries {shown}): their texts "
                                "were left out of the bundle, or erased outside `govgate audit prune`")
    if external is not None and not verdict.problems:
        _check_external(verdict, external, external_hash, public_key, first, last)
    return verdict


#: The fields of each kind of line, as :func:`write_bundle` writes them.
_HEADER_KEYS = frozenset({"bundle", "selection", "first_seq", "last_seq", "public_key", "exported_at"})
_CHECKPOINT_KEYS = frozenset({"format", "seq", "head_hash", "created_at", "closing", "key_id", "signature",
                              "public_key"})
#: An entry document's fields besides those its format hashes (``AuditEntry.to_document``).
_ENTRY_EXTRA_KEYS = frozenset({"created_at", "hash", "payload", "payload_digest", "format"})


def _keys_differ(found: dict[str, Any], expected: frozenset[str] | set[str]) -> str:
    extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    parts = ([f"unexpected {', '.join(map(repr, extra))}"] if extra else []) + (
        [f"missing {', '.join(map(repr, missing))}"] if missing else [])
    return "; ".join(parts)


def _line_shape_problem(item: Any) -> str | None:
    """Why a line after the header is not shaped as the exporter writes it (None when it is)."""
    if not isinstance(item, dict):
        return "neither a checkpoint nor an entry"
    if "checkpoint" in item:
        if set(item) != {"checkpoint"}:
            return f"a checkpoint line with other fields ({_keys_differ(item, {'checkpoint'})})"
        document = item["checkpoint"]
        if isinstance(document, dict) and set(document) != _CHECKPOINT_KEYS:
            return f"a checkpoint with other fields than a checkpoint's ({_keys_differ(document, _CHECKPOINT_KEYS)})"
        return None
    if set(item) != {"entry", "selected"}:
        return f"an entry line with other fields ({_keys_differ(item, {'entry', 'selected'})})"
    document = item["entry"]
    if isinstance(document, dict):
        try:
            expected = set(hashed_fields(document.get("format", FORMAT_1))) | _ENTRY_EXTRA_KEYS
        except (ValueError, TypeError):
            return f"an entry of an unknown format {document.get('format')!r}"
        if set(document) != expected:
            return f"an entry with other fields than its format's ({_keys_differ(document, expected)})"
    return None


def _check_external(verdict: BundleVerdict, external: Checkpoint, entry_hash: str | None, public_key: PublicKey,
                    first: int, last: int) -> None:
    """Hold a complete, anchored bundle to a checkpoint kept elsewhere (its signature, and its entry's hash)."""
    problem = external.signature_problem(public_key)
    if problem is not None:
        verdict.problems.append(f"checkpoint file: {problem}")
    elif not first <= external.seq <= last:
        verdict.external_checked = False
    elif entry_hash != external.head_hash:
        verdict.problems.append(f"checkpoint file at seq {external.seq} signs hash {external.head_hash[:16]}… but "
                                f"the bundle's entry {external.seq} holds {str(entry_hash)[:16]}… (the chain was "
                                "rewritten at or before it, and signed again)")
    else:
        verdict.external_checked = True


def _erased_span(doc: dict[str, Any]) -> tuple[int, int] | None:
    """The seqs a ``payloads_erased`` entry says its prune erased (a selected entry's missing payload is
    accounted for when one covers it; the range reaches the head, so every such record is in it)."""
    body = doc.get("body")
    if doc.get("kind") != "payloads_erased" or not isinstance(body, dict):
        return None
    low, high = body.get("first_seq"), body.get("last_seq")
    return (low, high) if type(low) is int and type(high) is int and low <= high else None


def _selection(doc: Any) -> Selection:
    if not isinstance(doc, dict):
        raise TypeError("selection")
    team, since = doc.get("team"), doc.get("since")
    if team is not None and not isinstance(team, str):
        raise TypeError("selection team")
    if since is None:
        return Selection(team=team)
    moment = datetime.fromisoformat(since)  # TypeError/ValueError for anything but an ISO string
    if moment.tzinfo is None:
        raise ValueError("selection 'since' has no time zone")
    return Selection(team=team, since=moment)


def _entry_problem(doc: dict[str, Any], chosen: bool, seq: int, prev_hash: str | None, prev_at: str | None,
                   first: int, selection: Selection) -> str | None:
    if doc.get("seq") != seq:
        return f"expected entry {seq}, found {doc.get('seq')!r} (entries are missing or out of order)"
    if prev_hash is not None and doc.get("prev_hash") != prev_hash:
        return f"entry {seq} does not link to entry {seq - 1}"
    if seq == 1 and doc.get("prev_hash") != GENESIS_HASH:
        return "entry 1 does not start from the genesis hash"
    try:
        recomputed = document_hash(doc)
        created_at = datetime.fromisoformat(doc["created_at"])
        if created_at.tzinfo is None:
            raise ValueError("created_at has no time zone")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        return f"entry {seq} lacks a hashed field or has a malformed one ({exc})"
    if recomputed != doc.get("hash"):
        return f"entry {seq}'s fields do not hash to its hash (the entry was altered)"
    if prev_at is not None and doc["created_at"] < prev_at:
        return f"entry {seq} is dated before entry {seq - 1}: the selection by time cannot be trusted"
    if chosen != selection.matches(doc.get("team"), created_at):
        which = "selected but outside" if chosen else "left out although inside"
        return f"entry {seq} is {which} the selection (the selection is incomplete or padded)"
    if seq == first and first > 1 and selection.since is not None and created_at >= selection.since:
        return (f"the first entry {seq} is not earlier than the selection's start: "
                "entries before it may have been left out")
    payload = doc.get("payload")
    if doc.get("format", FORMAT_1) == FORMAT_1 and (payload is not None or doc.get("payload_digest") is not None):
        return (f"entry {seq} is format 1 but carries a payload or payload_digest, which format 1 does not chain "
                "(added after the fact)")
    if payload is not None:
        if not chosen:
            return f"entry {seq} is not selected but carries its payload"
        try:
            matches = payload_digest(canonical_json(payload)) == doc.get("payload_digest")
        except (TypeError, ValueError, RecursionError):
            matches = False
        if not matches:
            return f"entry {seq}'s payload does not match its digest"
    return None
