"""Keys on the chain: what the chain says each API key should be, and where the key table disagrees.

Every change to a key (created, revoked, roles changed) is an audit entry,
written in the same transaction as the key row (``gateway/auth/keys.py``).
This module folds those entries, in chain order, into the state each key
should have now, and compares that with the key rows a caller passes in as
plain :class:`KeyRecord` values: ``audit`` never imports the gateway, so it
does not know the key table, only what a key row says.

A key row changed by plain SQL (roles given, a revocation undone, a row
inserted or deleted, a key's hash swapped for one whose secret the writer
knows) has no matching entry, so it shows up here as a :class:`Discrepancy`.
Someone who appends matching entries through govgate leaves exactly the
trace this is for. Entry bodies (docs/architecture.md, "Keys on the chain"):

- ``key_created``: ``{key_id, user, team, roles, note?, fingerprint, by}``
- ``key_created`` backfill (one per store, written at the first start after
  the upgrade, before any other key entry): ``{backfilled: true, by, keys:
  [{key_id, user, team, roles, revoked, note?, fingerprint}, …]}``
- ``key_revoked``: ``{key_id, by}``
- ``key_roles_changed``: ``{key_id, old_roles, new_roles, by}``

The key's secret and its stored digest are never in an entry; the
fingerprint is a one-way function of the digest (:func:`key_fingerprint`),
so it proves which digest a key had without being usable to authenticate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from sqlalchemy import Engine, Select, func, select

from .db import DB_ERRORS, describe, reason
from .entry import AuditEntry
from .errors import AuditError
from .kinds import KEY_CREATED, KEY_KINDS, KEY_REVOKED, KEY_ROLES_CHANGED
from .tables import audit_table

#: The request_id of the one backfill entry (looked up through the request_id index at every start).
BACKFILL_REQUEST_ID = "keys-backfill"

_FINGERPRINT_DOMAIN = b"govgate key fingerprint v1\x00"


def key_request_id(key_id: str) -> str:
    """The request_id of every entry about one key, so a key's history is one indexed look-up."""
    return f"key-{key_id}"


def key_fingerprint(key_digest: str) -> str:
    """What the chain records about a key's stored digest: SHA-256 of it under a fixed prefix.

    The digest is SHA-256 of a 256-bit random secret; hashing it again
    cannot be reversed to the digest, let alone the secret, and a gateway
    compares digests, never fingerprints. Recording it lets verify notice a
    row whose digest was replaced by one whose secret the writer knows.
    """
    return hashlib.sha256(_FINGERPRINT_DOMAIN + key_digest.encode("ascii")).hexdigest()


class EntryLike(Protocol):
    """What :func:`fold` reads from an entry (an :class:`audit.AuditEntry` has it)."""

    seq: int
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key row as the caller read it.

    ``user`` None means owner and team are not compared (``team`` None is
    then a real "no team"); ``fingerprint`` None means the digest is not.
    """

    key_id: str
    roles: tuple[str, ...]
    revoked: bool
    user: str | None = None
    team: str | None = None
    fingerprint: str | None = None
    #: The key's note (compared, with user and team, when ``user`` is given).
    note: str | None = None


@dataclass(slots=True)
class ChainKey:
    """A key as the chain says it should be now."""

    key_id: str
    user: str | None
    team: str | None
    roles: tuple[str, ...]
    revoked: bool
    fingerprint: str | None
    created_seq: int
    last_seq: int
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One way the key table and the chain (or the chain and itself) disagree.

    ``code`` is one of: ``not_on_chain`` (a key row no entry created),
    ``missing_from_table`` (a key the chain created has no row),
    ``roles_differ``, ``revoked_in_table_only``, ``revoked_on_chain_only``,
    ``user_differs``, ``team_differs``, ``note_differs``, ``fingerprint_differs`` and, for
    the chain's own key entries, ``chain_inconsistent`` (e.g. a revocation of
    a key never created) and ``malformed_entry``. ``seq`` is the entry it is
    about, when there is one.
    """

    code: str
    key_id: str | None
    detail: str
    seq: int | None = None

    def describe(self) -> str:
        where = f" (entry {self.seq})" if self.seq is not None else ""
        return f"key {self.key_id or '?'}: {self.code}: {self.detail}{where}"


@dataclass(slots=True)
class KeyLedger:
    """The fold of the chain's key entries: each key's state, and what did not fit."""

    keys: dict[str, ChainKey] = field(default_factory=dict)
    problems: list[Discrepancy] = field(default_factory=list)
    backfill_seq: int | None = None
    entries: int = 0


def _roles(value: Any) -> tuple[str, ...] | None:
    """Roles as a sorted tuple of distinct names, or None when ``value`` is not a list of strings."""
    if not isinstance(value, list) or not all(isinstance(role, str) for role in value):
        return None
    return tuple(sorted(set(value)))


def _show(roles: Iterable[str]) -> str:
    return ",".join(roles) or "(none)"


def _new_key(item: Any, seq: int, *, revoked: bool) -> ChainKey | None:
    """A created key from a ``key_created`` body (or one backfilled item); None if malformed."""
    if not isinstance(item, dict) or not isinstance(item.get("key_id"), str):
        return None
    roles = _roles(item.get("roles"))
    user, team, fingerprint = item.get("user"), item.get("team"), item.get("fingerprint")
    note = item.get("note")
    if roles is None or not isinstance(user, str) or not isinstance(team, (str, type(None))) \
            or not isinstance(fingerprint, (str, type(None))) or not isinstance(note, (str, type(None))):
        return None
    return ChainKey(key_id=item["key_id"], user=user, team=team, roles=roles, revoked=revoked,
                    fingerprint=fingerprint, created_seq=seq, last_seq=seq, note=note)


def fold(entries: Iterable[EntryLike]) -> KeyLedger:
    """Apply the key entries (in seq order; other kinds are skipped) to an empty ledger."""
    ledger = KeyLedger()
    for entry in entries:
        if entry.kind in KEY_KINDS:
            ledger.entries += 1
            _apply(ledger, entry)
    return ledger


def _apply(ledger: KeyLedger, entry: EntryLike) -> None:
    body, seq, keys = entry.body, entry.seq, ledger.keys

    def problem(code: str, key_id: str | None, detail: str) -> None:
        ledger.problems.append(Discrepancy(code, key_id, detail, seq))

    key_id = body.get("key_id") if isinstance(body, dict) else None
    if entry.kind == KEY_CREATED and isinstance(body, dict) and body.get("backfilled") is True:
        _apply_backfill(ledger, entry)
        return
    if not isinstance(key_id, str):
        problem("malformed_entry", None, f"{entry.kind} entry without a key_id")
        return
    known = keys.get(key_id)
    if entry.kind == KEY_CREATED:
        created = _new_key(body, seq, revoked=False)
        if created is None:
            problem("malformed_entry", key_id, "key_created entry without user or roles")
        elif known is not None:
            problem("chain_inconsistent", key_id, f"created again (first created at entry {known.created_seq})")
        else:
            keys[key_id] = created
        return
    if known is None:
        problem("chain_inconsistent", key_id, f"{entry.kind} of a key the chain never created")
        return
    known.last_seq = seq
    if entry.kind == KEY_REVOKED:
        if known.revoked:
            problem("chain_inconsistent", key_id, "revoked again")
        known.revoked = True
    elif entry.kind == KEY_ROLES_CHANGED:
        old, new = _roles(body.get("old_roles")), _roles(body.get("new_roles"))
        if old is None or new is None:
            problem("malformed_entry", key_id, "key_roles_changed entry without old_roles/new_roles lists")
            return
        if known.revoked:
            problem("chain_inconsistent", key_id, "roles changed after the key was revoked")
        if old != known.roles:
            problem("chain_inconsistent", key_id, f"roles changed from {_show(old)} but the chain had "
                                                  f"{_show(known.roles)}")
        known.roles = new


def _apply_backfill(ledger: KeyLedger, entry: EntryLike) -> None:
    """The one backfill entry: the keys that existed when keys went on the chain.

    It is trusted only as the first key entry of the store: a later one (a
    bug, or someone running the backfill by hand to make a planted row look
    legitimate) is reported and its keys are not taken.
    """
    seq = entry.seq
    if ledger.backfill_seq is not None or ledger.entries > 1:
        what = (f"a second key backfill (the first is entry {ledger.backfill_seq})" if ledger.backfill_seq
                else "a key backfill after other key entries")
        ledger.problems.append(Discrepancy("chain_inconsistent", None, f"{what}: its keys are not trusted", seq))
        return
    ledger.backfill_seq = seq
    items = entry.body.get("keys")
    if not isinstance(items, list):
        ledger.problems.append(Discrepancy("malformed_entry", None, "key backfill without a keys list", seq))
        return
    for item in items:
        key = _new_key(item, seq, revoked=bool(item.get("revoked")) if isinstance(item, dict) else False)
        if key is None:
            ledger.problems.append(Discrepancy("malformed_entry", None, "a backfilled key without id, user or roles",
                                               seq))
        elif key.key_id in ledger.keys:
            ledger.problems.append(Discrepancy("chain_inconsistent", key.key_id, "backfilled twice", seq))
        else:
            ledger.keys[key.key_id] = key


def reconcile(ledger: KeyLedger, rows: Iterable[KeyRecord]) -> list[Discrepancy]:
    """Everything that does not fit: the ledger's own problems, then row by row, then keys without a row."""
    found = list(ledger.problems)
    seen: set[str] = set()
    for row in rows:
        seen.add(row.key_id)
        key = ledger.keys.get(row.key_id)
        if key is None:
            found.append(Discrepancy("not_on_chain", row.key_id,
                                     "the key table has this key but no entry created it (a row written "
                                     "outside govgate)"))
            continue
        found.extend(_compare(key, row))
    for key_id in sorted(set(ledger.keys) - seen):
        key = ledger.keys[key_id]
        found.append(Discrepancy("missing_from_table", key_id,
                                 "the chain created this key but the key table has no row (a row deleted)",
                                 key.created_seq))
    return found


def _compare(key: ChainKey, row: KeyRecord) -> Iterator[Discrepancy]:
    row_roles = tuple(sorted(set(row.roles)))
    if row_roles != key.roles:
        yield Discrepancy("roles_differ", key.key_id, f"the key table gives roles {_show(row_roles)}, the chain "
                                                      f"says {_show(key.roles)}", key.last_seq)
    if row.revoked and not key.revoked:
        yield Discrepancy("revoked_in_table_only", key.key_id,
                          "the key table says revoked, but no entry revoked it", key.last_seq)
    if key.revoked and not row.revoked:
        yield Discrepancy("revoked_on_chain_only", key.key_id,
                          "the chain revoked this key, but the key table has it live (revocation undone)",
                          key.last_seq)
    if row.user is not None:  # the caller gave the key's owner: user, team and note are compared
        # (a note is set once, at creation: an edited one showed in `keys list` and the keys page as fact)
        for name in ("user", "team", "note"):
            row_value, chain_value = getattr(row, name), getattr(key, name)
            if row_value != chain_value:
                yield Discrepancy(f"{name}_differs", key.key_id, f"the key table says {name} {row_value!r}, "
                                                                f"the chain says {chain_value!r}", key.created_seq)
    if row.fingerprint is not None and key.fingerprint is not None and row.fingerprint != key.fingerprint:
        yield Discrepancy("fingerprint_differs", key.key_id, "the key's stored digest is not the one it was "
                                                             "created with (its secret was swapped)", key.created_seq)


def count_key_entries(up_to: int) -> Select[Any]:
    """A query counting the chain's key entries, stopping at ``up_to`` (is there any? only one?).

    A scan of ``kind`` (no index) that stops at ``up_to`` matches: the
    backfill check runs it at each start of a store without a backfill
    entry, where the first key entry (``govgate up``'s admin key) is among
    the first entries, and once under the append lock when it backfills.
    """
    some = select(audit_table.c.seq).where(audit_table.c.kind.in_(sorted(KEY_KINDS))).limit(up_to).subquery()
    return select(func.count()).select_from(some)


def read_ledger(engine: Engine) -> KeyLedger:
    """Fold the store's key entries (a scan of ``kind``; key entries are few, so all are held)."""
    statement = select(audit_table).where(audit_table.c.kind.in_(sorted(KEY_KINDS))).order_by(audit_table.c.seq)
    try:
        with engine.connect() as conn:
            entries = [AuditEntry.from_row(row) for row in conn.execute(statement).mappings()]
    except (*DB_ERRORS, ValueError, TypeError) as exc:
        raise AuditError(f"cannot read the key entries from {describe(engine)}: {reason(exc)}") from exc
    return fold(entries)
