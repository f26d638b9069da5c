"""API keys: issued once, stored only as a hash, compared in constant time, every change on the chain.

A key looks like ``gk_<key id>_<secret>``. The key id is public (it appears
in listings and audit entries, so a reviewer can tell which key made a
request without seeing the key); the secret is 256 random bits. Because the
secret is high-entropy, a single SHA-256 is enough to make the stored hash
useless to someone who reads the database: there is nothing to brute-force.

Every change (created, revoked, roles changed) is an audit entry written in
the same database transaction as the key row, under the audit store's write
lock (``AuditStore.append``'s ``alongside``), so there is never a key change
without its entry nor an entry without its change; ``govgate audit verify``
holds the key table to those entries (:mod:`audit.key_ledger`).
docs/architecture.md, "Keys on the chain".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from sqlalchemy import Engine, and_, func, insert, or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, select

from audit import AuditError, AuditStore
from audit.db import reason
from audit.key_ledger import BACKFILL_REQUEST_ID, count_key_entries, key_fingerprint, key_request_id
from audit.kinds import KEY_CREATED, KEY_REVOKED, KEY_ROLES_CHANGED

KEY_PREFIX = "gk_"
_KEY_RE = re.compile(r"^gk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")

log = logging.getLogger(__name__)


class KeyStoreError(RuntimeError):
    """The key store cannot be read or written (the gateway fails closed)."""


class NameLookAlike(ValueError):
    """A new key's user or team differs only in case from a live key's.

    Policies (``teams.<team>``, ``limits.principals.<id>``), usage counters
    and fair-share queues match names exactly, so ``Support`` would be a
    team of its own: outside ``support``'s model list, limits and share.
    """

    def __init__(self, kind: str, value: str, existing: str) -> None:
        #: The refusal without the refused value (the HTTP API and the console name a refused field, never quote
        #: it); the existing name, a live key's, is what to use instead.
        self.why = (f"differs only in case from the existing {kind} {existing!r}; names are matched exactly "
                    f"(policy, limits, fair share), so it would be another {kind}: use {existing!r}")
        super().__init__(f"{kind} {value!r} {self.why}")
        self.kind = kind
        self.existing = existing


#: User and team names the policy's data keeps for itself: ``limits.principals.default`` and
#: ``limits.teams.default`` are the limits of every principal and team without an entry of their own, and
#: ``teams.default.share`` the share of every team without one (policies/limits.rego, gateway/policy/shares.py).
#: A key named so would be read as everyone's entry. (``*``, the shares' "any team", is no valid name anyway.)
RESERVED_NAMES = ("default",)


class ReservedName(ValueError):
    """A new key's user or team is a name the policy's data reserves (:data:`RESERVED_NAMES`, in any case)."""

    def __init__(self, kind: str, value: str) -> None:
        entries = "limits.principals.default" if kind == "user" else "limits.teams.default and teams.default.share"
        #: The refusal without the value (the HTTP API names a refused field, never quotes it).
        self.why = (f"is a reserved name: the policy's data keeps {', '.join(repr(name) for name in RESERVED_NAMES)} "
                    f"(in any case) for the entries of every {kind} without one of its own ({entries}); choose "
                    f"another {kind} name")
        super().__init__(f"{kind} {value!r} {self.why}")
        self.kind = kind


def refuse_reserved(kind: str, value: str) -> None:
    """Raise :class:`ReservedName` when ``value`` (a user or team) is one of :data:`RESERVED_NAMES`."""
    if value.lower() in RESERVED_NAMES:
        raise ReservedName(kind, value)


class LastHolderError(Exception):
    """A change refused because it would leave no live key with a role that must keep a holder.

    Raised from inside the change's transaction (so nothing was written):
    the key administration API keeps one live ``admin`` key, or nobody could
    administer keys over HTTP again.
    """

    def __init__(self, role: str, key_id: str) -> None:
        super().__init__(f"key {key_id} holds the last live {role!r} role")
        self.role = role
        self.key_id = key_id


class ApiKey(SQLModel, table=True):
    """One issued key. Rows are never deleted: revocation keeps the history."""

    __tablename__ = "api_keys"

    key_id: str = Field(primary_key=True, max_length=12)
    key_hash: str = Field(max_length=64)
    user: str = Field(index=True, max_length=128)
    team: str | None = Field(default=None, max_length=128)
    roles_json: str = Field(default="[]")
    created_at: str
    revoked_at: str | None = Field(default=None)
    note: str | None = Field(default=None, max_length=256)

    @property
    def roles(self) -> list[str]:
        """The key's roles; none when the column is not a JSON list of strings (only a hand in the database
        writes one): such a key may do nothing a role allows, and ``govgate audit verify`` names its row.
        Before (probe s59 F8) each of its requests was a 500, and so was every admin's list of keys."""
        try:
            value = json.loads(self.roles_json)
        except (TypeError, ValueError):
            value = None
        if isinstance(value, list) and all(isinstance(role, str) for role in value):
            return value
        log.warning("key %s: its roles in the key table are unreadable (not a JSON list of names); it is given "
                    "none (run `govgate audit verify`)", self.key_id)
        return []


@dataclass(frozen=True)
class Principal:
    """Who is asking: what policies see as ``input.principal``."""

    id: str
    team: str | None
    roles: tuple[str, ...]
    key_id: str

    def policy_view(self) -> dict:
        return {"id": self.id, "team": self.team, "roles": list(self.roles), "key_id": self.key_id}


@dataclass(frozen=True)
class IssuedKey:
    """A new key: ``secret`` is shown once and never stored."""

    secret: str
    key: ApiKey


def key_digest(secret: str) -> str:
    """The stored form of a key: SHA-256 of the whole secret (the principal cache is keyed by it too)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def well_formed(presented: str) -> bool:
    """True when ``presented`` has a key's shape (anything else is refused without a lookup)."""
    return _KEY_RE.match(presented) is not None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_name(kind: str, value: str) -> str:
    """User, team and role names: short, printable, no spaces (they reach logs and Rego)."""
    if not _NAME_RE.fullmatch(value):  # not match: "$" would let a trailing newline through
        raise ValueError(f"{kind} {value!r} must be 1-128 letters, digits or . _ @ - (starting with a letter or digit)")
    return value


#: Told the id of a key whose access changed, after the change is committed.
KeyChanged = Callable[[str], None]

#: ``by`` when a caller does not say who made a change (the CLI and ``govgate up`` always say).
UNSPECIFIED_ACTOR = "unspecified"


@dataclass(frozen=True)
class RolesChange:
    """What :meth:`KeyStore.set_roles` did; ``changed`` is False when the key already had those roles."""

    key_id: str
    old_roles: list[str]
    new_roles: list[str]
    changed: bool


class _Abandon(Exception):
    """Raised inside an append's transaction to roll back both the entry and the key change."""


def _execute(cursor: Any, dialect: Any, statement: Any) -> Any:
    """Run a Core statement on the append transaction's DBAPI cursor (the chain's own connection)."""
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    cursor.execute(str(compiled), [params[name] for name in compiled.positiontup] if dialect.positional else params)
    return cursor


class KeyStore:
    """Create, list, revoke, re-role and check keys in the gateway's database.

    Each change is appended to the audit chain together with the key row
    (same transaction); ``by`` names who made it (``cli:<os user>``,
    ``govgate-up``). Running gateways cache principals
    (``gateway/auth/principal_cache.py``), so every method that changes what
    a key may do calls ``on_change`` with the key id once its change is
    committed; the CLI passes a
    :class:`gateway.auth.key_changes.KeyChangeAnnouncer`, which PUBLISHes it
    to the gateways. Creating a key needs no signal: unknown keys are never
    cached.
    """

    def __init__(self, engine: Engine, *, on_change: KeyChanged | None = None) -> None:
        self.engine = engine
        self._on_change = on_change
        self._audit = AuditStore(engine)

    def create(self, user: str, *, team: str | None, roles: list[str], note: str | None = None,
               by: str = UNSPECIFIED_ACTOR) -> IssuedKey:
        validate_name("user", user)
        if team is not None:
            validate_name("team", team)
        for role in roles:
            validate_name("role", role)
        refuse_reserved("user", user)
        if team is not None:
            refuse_reserved("team", team)
        self._refuse_look_alike("user", user)
        if team is not None:
            self._refuse_look_alike("team", team)
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        sorted_roles = sorted(set(roles))
        row = ApiKey(key_id=key_id, key_hash=key_digest(secret), user=user, team=team,
                     roles_json=json.dumps(sorted_roles), created_at=_now(), note=note)
        body: dict[str, Any] = {"key_id": key_id, "user": user, "team": team, "roles": sorted_roles,
                                "fingerprint": key_fingerprint(row.key_hash), "by": by}
        if note is not None:
            body["note"] = note
        values = row.model_dump()

        def write(cursor: Any) -> None:
            _execute(cursor, self.engine.dialect, insert(ApiKey.__table__).values(**values))

        self._append(KEY_CREATED, row, body, write, what="cannot store the new key")
        return IssuedKey(secret=secret, key=row)

    def _refuse_look_alike(self, kind: str, value: str) -> None:
        """Raise :class:`NameLookAlike` when a live key spells ``value`` (a user or team) in another case."""
        column = ApiKey.user if kind == "user" else ApiKey.team
        statement = (select(column).where(ApiKey.revoked_at.is_(None), func.lower(column) == value.lower(),
                                          column != value).limit(1))
        try:
            with Session(self.engine) as session:
                existing = session.exec(statement).first()
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {reason(exc)}") from exc
        if existing is not None:
            raise NameLookAlike(kind, value, existing)

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        statement = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id)
        if not include_revoked:
            statement = statement.where(ApiKey.revoked_at.is_(None))
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                return list(session.exec(statement))
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {reason(exc)}") from exc

    def get(self, key_id: str) -> ApiKey | None:
        """One key by id, revoked or not."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                return session.get(ApiKey, key_id)
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {reason(exc)}") from exc

    def page(self, *, after: str | None, limit: int,
             include_revoked: bool = False) -> tuple[list[ApiKey], bool] | None:
        """Up to ``limit`` keys in ``list``'s order after the key ``after``, and whether more follow.

        Keyset paging on (created_at, key_id): rows are never deleted, so
        the key a cursor names always exists (even revoked since), and a key
        created while paging never shifts a page: it comes on a later one, or
        not at all when it sorts before the cursor (same second, lower id).
        None when ``after`` names no key.
        """
        statement = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id).limit(limit + 1)
        if not include_revoked:
            statement = statement.where(ApiKey.revoked_at.is_(None))
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                if after is not None:
                    last = session.get(ApiKey, after)
                    if last is None:
                        return None
                    statement = statement.where(or_(ApiKey.created_at > last.created_at,
                                                    and_(ApiKey.created_at == last.created_at,
                                                         ApiKey.key_id > last.key_id)))
                rows = list(session.exec(statement))
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {reason(exc)}") from exc
        return rows[:limit], len(rows) > limit

    def revoke(self, key_id: str, *, by: str = UNSPECIFIED_ACTOR, keep_role: str | None = None) -> bool:
        """Revoke by key id; False when no such live key exists.

        The UPDATE is conditional (``revoked_at IS NULL``) and runs in the
        entry's transaction: when another writer revoked the key first, it
        changes nothing and the entry is rolled back with it, so revoking
        twice writes one entry. With ``keep_role``, revoking the last live
        key holding that role raises :class:`LastHolderError` (checked in
        the same transaction, under the append lock, so two admins revoking
        each other's keys at once cannot both succeed).
        """
        row = self.get(key_id)
        if row is None or row.revoked_at is not None:
            return False
        statement = (update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
                     .values(revoked_at=_now()))
        guarded = keep_role if keep_role is not None and keep_role in row.roles else None

        def write(cursor: Any) -> None:
            if _execute(cursor, self.engine.dialect, statement).rowcount != 1:
                raise _Abandon
            self._keep_a_holder(cursor, guarded, key_id)

        try:
            self._append(KEY_REVOKED, row, {"key_id": key_id, "by": by}, write, what=f"cannot revoke key {key_id}")
        except _Abandon:
            return False
        self._changed(key_id)
        return True

    def set_roles(self, key_id: str, roles: list[str], *, by: str = UNSPECIFIED_ACTOR,
                  keep_role: str | None = None) -> RolesChange | None:
        """Give a live key exactly ``roles``; None when no such live key exists.

        Compare-and-set on the roles the key had when read, inside the
        entry's transaction, so the entry's ``old_roles`` are always the
        roles it replaced; a concurrent change makes it read and try again.
        With ``keep_role``, taking that role from its last live holder raises
        :class:`LastHolderError` (see :meth:`revoke`).
        """
        for role in roles:
            validate_name("role", role)
        new_roles = sorted(set(roles))
        for _attempt in range(5):
            row = self.get(key_id)
            if row is None or row.revoked_at is not None:
                return None
            old_roles = row.roles
            if old_roles == new_roles:
                return RolesChange(key_id, old_roles, new_roles, changed=False)
            statement = (update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None),
                                              ApiKey.roles_json == row.roles_json)
                         .values(roles_json=json.dumps(new_roles)))

            guarded = keep_role if keep_role in old_roles and keep_role not in new_roles else None

            def write(cursor: Any, statement: Any = statement, guarded: str | None = guarded) -> None:
                if _execute(cursor, self.engine.dialect, statement).rowcount != 1:
                    raise _Abandon
                self._keep_a_holder(cursor, guarded, key_id)

            body = {"key_id": key_id, "old_roles": old_roles, "new_roles": new_roles, "by": by}
            try:
                self._append(KEY_ROLES_CHANGED, row, body, write, what=f"cannot change the roles of key {key_id}")
            except _Abandon:
                continue  # changed or revoked meanwhile: read it again
            self._changed(key_id)
            return RolesChange(key_id, old_roles, new_roles, changed=True)
        raise KeyStoreError(f"cannot change the roles of key {key_id}: it kept changing under us")

    def has_role(self, role: str) -> bool:
        """True when some live key carries ``role`` (``up`` uses it to make the admin key once)."""
        return any(role in key.roles for key in self.list())

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of a live key, or None. Raises KeyStoreError if the store is down."""
        match = _KEY_RE.match(presented)
        if not match:
            return None
        try:
            with Session(self.engine) as session:
                row = session.get(ApiKey, match.group(1))
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {reason(exc)}") from exc
        # Compare even when the row is missing so timing does not reveal key ids.
        expected = row.key_hash if row is not None else "0" * 64
        if not hmac.compare_digest(expected, key_digest(presented)) or row is None or row.revoked_at is not None:
            return None
        return Principal(id=row.user, team=row.team, roles=tuple(row.roles), key_id=row.key_id)

    # -- the chain ---------------------------------------------------------

    def _append(self, kind: str, row: ApiKey, body: dict[str, Any], write: Callable[[Any], None], *,
                what: str) -> None:
        """Append the entry and run ``write`` (the key row's change) in its transaction."""
        try:
            self._audit.append(kind, key_request_id(row.key_id), principal=row.user, team=row.team, model=None,
                               body=body, policy_revision=None, alongside=write)
        except AuditError as exc:
            raise KeyStoreError(f"{what}: {exc}") from exc

    def _keep_a_holder(self, cursor: Any, role: str | None, key_id: str) -> None:
        """Inside a change's transaction, after its UPDATE: refuse it if no live key holds ``role`` any more.

        Roles are stored as the JSON of a sorted list of validated names
        (no quote can occur in one), so ``"<role>"`` matches exactly that
        role; ``_`` is escaped as LIKE would read it as a wildcard.
        """
        if role is None:
            return
        pattern = '%"' + role.replace("_", "\\_") + '"%'
        holders = (select(func.count()).select_from(ApiKey)
                   .where(ApiKey.revoked_at.is_(None), ApiKey.roles_json.like(pattern, escape="\\")))
        if _execute(cursor, self.engine.dialect, holders).fetchone()[0] == 0:
            raise LastHolderError(role, key_id)

    def _changed(self, key_id: str) -> None:
        if self._on_change is not None:
            self._on_change(key_id)

    def record_existing_keys(self, *, by: str = "upgrade") -> int | None:
        """Put the keys made before keys went on the chain onto it, once: one backfill entry.

        Runs at every :func:`gateway.db_setup.open_database`: one look-up
        through the ``request_id`` index once a backfill exists; in a store
        that began with keys on the chain, a ``kind`` scan that stops at the
        first key entry, near the start. It writes only while the chain has
        no key entry at all and the key table has rows, i.e. at the first
        start after the upgrade; a fresh store's first key is created with
        its own entry, so a row planted by SQL later is never backfilled. Under the
        append lock it checks again that it is the only key entry, so
        gateways starting together write it once. Returns how many keys it
        recorded, or None when there was nothing to do.
        """
        try:
            if self._audit.entries_for(BACKFILL_REQUEST_ID):
                return None
            rows = self.list(include_revoked=True)
            if not rows:
                return None
            with self.engine.connect() as conn:
                if conn.execute(count_key_entries(1)).scalar_one():
                    return None
        except (AuditError, SQLAlchemyError) as exc:
            raise KeyStoreError(f"cannot check the keys against the audit chain: {reason(exc)}") from exc
        items = []
        for row in rows:
            item: dict[str, Any] = {"key_id": row.key_id, "user": row.user, "team": row.team, "roles": row.roles,
                                    "revoked": row.revoked_at is not None,
                                    "fingerprint": key_fingerprint(row.key_hash)}
            if row.note is not None:
                item["note"] = row.note
            items.append(item)

        def only_one(cursor: Any) -> None:
            if _execute(cursor, self.engine.dialect, count_key_entries(2)).fetchone()[0] > 1:
                raise _Abandon  # another process recorded keys first

        try:
            self._audit.append(KEY_CREATED, BACKFILL_REQUEST_ID, principal=None, team=None, model=None,
                               body={"backfilled": True, "by": by, "keys": items}, policy_revision=None,
                               alongside=only_one)
        except _Abandon:
            return None
        except AuditError as exc:
            raise KeyStoreError(f"cannot record the existing keys on the audit chain: {exc}") from exc
        return len(items)
