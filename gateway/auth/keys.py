"""API keys: issued once, stored only as a hash, compared in constant time.

A key looks like ``gk_<key id>_<secret>``. The key id is public (it appears
in listings and audit entries, so a reviewer can tell which key made a
request without seeing the key); the secret is 256 random bits. Because the
secret is high-entropy, a single SHA-256 is enough to make the stored hash
useless to someone who reads the database: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy import update
from sqlmodel import Field, Session, SQLModel, select

KEY_PREFIX = "gk_"
_KEY_RE = re.compile(r"^gk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class KeyStoreError(RuntimeError):
    """The key store cannot be read or written (the gateway fails closed)."""


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
        return json.loads(self.roles_json)


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
    if not _NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-128 letters, digits or . _ @ - (starting with a letter or digit)")
    return value


#: Told the id of a key whose access was narrowed, after the change is committed.
KeyChanged = Callable[[str], None]


class KeyStore:
    """Create, list, revoke and check keys in the gateway's database.

    Running gateways cache principals (``gateway/auth/principal_cache.py``),
    so every method that narrows what a key may do calls ``on_change`` with
    the key id once its change is committed; the CLI passes a
    :class:`gateway.auth.key_changes.KeyChangeAnnouncer`, which PUBLISHes it
    to the gateways. Creating a key needs no signal: unknown keys are never
    cached.
    """

    def __init__(self, engine: Engine, *, on_change: KeyChanged | None = None) -> None:
        self.engine = engine
        self._on_change = on_change

    def create(self, user: str, *, team: str | None, roles: list[str], note: str | None = None) -> IssuedKey:
        validate_name("user", user)
        if team is not None:
            validate_name("team", team)
        for role in roles:
            validate_name("role", role)
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKey(key_id=key_id, key_hash=key_digest(secret), user=user, team=team,
                     roles_json=json.dumps(sorted(set(roles))), created_at=_now(), note=note)
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                session.add(row)
                session.commit()
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot store the new key: {exc}") from exc
        return IssuedKey(secret=secret, key=row)

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        statement = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_id)
        if not include_revoked:
            statement = statement.where(ApiKey.revoked_at.is_(None))
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                return list(session.exec(statement))
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot read keys: {exc}") from exc

    def revoke(self, key_id: str) -> bool:
        """Revoke by key id; False when no such live key exists.

        One conditional UPDATE (no read-then-write), so it cannot lose a race
        with another writer on SQLite and revoking twice is harmless.
        """
        statement = (update(ApiKey).where(ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))
                     .values(revoked_at=_now()))
        try:
            with Session(self.engine) as session:
                changed = session.exec(statement).rowcount
                session.commit()
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"cannot revoke key {key_id}: {exc}") from exc
        if changed == 1 and self._on_change is not None:
            self._on_change(key_id)
        return changed == 1

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
            raise KeyStoreError(f"cannot read keys: {exc}") from exc
        # Compare even when the row is missing so timing does not reveal key ids.
        expected = row.key_hash if row is not None else "0" * 64
        if not hmac.compare_digest(expected, key_digest(presented)) or row is None or row.revoked_at:
            return None
        return Principal(id=row.user, team=row.team, roles=tuple(row.roles), key_id=row.key_id)
