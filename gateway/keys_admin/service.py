"""Key administration on behalf of one admin: create, list, read, revoke and re-role keys.

Plain async methods over :class:`gateway.auth.KeyStore` and the acting
admin's principal, so the HTTP API (``gateway/api/admin_keys.py``) and a
console page can share every rule: only a key with the ``admin`` role gets
a :class:`KeyAdmin` at all; names are validated as the store validates
them; roles must be ones the policy knows (``gateway/keys_admin/roles.py``,
as ``govgate keys`` checks them); the last live admin key can be neither
revoked nor stripped of ``admin`` (checked inside the change's transaction,
``KeyStore``'s ``keep_role``), since nobody could administer keys over HTTP
again; every change is an audit entry whose ``by`` is ``key:<the admin's key
id>``; a narrowing change is signalled to every gateway at once
(:class:`gateway.keys_admin.signal.KeyChangeSignal`).

Refusals are :class:`KeyAdminError` subclasses carrying a message fit to
show (never a secret, never the text of a value that failed a check) and
the field it is about; the API maps each to its HTTP status and code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Final

import anyio

from gateway.auth.keys import (KEY_PREFIX, ApiKey, IssuedKey, KeyStore, KeyStoreError, LastHolderError, NameLookAlike,
                               Principal, ReservedName, refuse_reserved, validate_name)
from gateway.keys_admin.roles import RolesUnreadable, UnknownRoles, checked_roles, policy_roles

#: The role that may administer keys.
ADMIN_ROLE: Final = "admin"
#: Longest name (user, team, role) a key row holds; longest note.
MAX_NAME: Final = 128
MAX_NOTE: Final = 256
#: Keys per page of a listing: by default, and at most.
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
#: Most roles one key may hold (a policy with more roles than this is not one people can reason about).
MAX_ROLES: Final = 32
_HEX = frozenset("0123456789abcdef")

#: Drops a key from this gateway's cache, tells the others; returns why it could not tell them, or None.
Signal = Callable[[str], Awaitable[str | None]]


class KeyAdminError(Exception):
    """A refused administration request; ``param`` names the field or parameter it is about."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotAdmin(KeyAdminError):
    """The acting key lacks the ``admin`` role."""


class InvalidField(KeyAdminError):
    """A user, team, role or note that a key cannot hold."""


class UnknownRole(KeyAdminError):
    """No role given, or one the policy does not know."""


class UnknownCursor(KeyAdminError):
    """A list cursor that names no key."""


class KeyNotFound(KeyAdminError):
    """No key has this id."""


class KeyIsRevoked(KeyAdminError):
    """The key is revoked: its roles can no longer change."""


class LastAdmin(KeyAdminError):
    """The change would leave no live admin key."""


class KeysUnavailable(KeyAdminError):
    """The key store (database) or the policy's files cannot be read or written; nothing was changed."""


@dataclass(frozen=True)
class KeyPage:
    """One page of keys; ``next_cursor`` (the last key's id) asks for the next, None on the last page."""

    keys: list[ApiKey]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True)
class KeyChange:
    """A key after a revocation or a roles change.

    ``changed`` is False when the key already was so (revoked, or holding
    exactly those roles): nothing was written. ``warning`` says, when the
    change could not be signalled, how long another gateway may lag.
    """

    key: ApiKey
    changed: bool
    warning: str | None = None


def _not_found(key_id: str) -> KeyNotFound:
    """No such key; a secret pasted where the id belongs is named as such, and never echoed back."""
    if key_id.startswith(KEY_PREFIX):
        carried = key_id.split("_")[1] if key_id.count("_") >= 2 else ""
        hint = f" (this one's id is {carried})" if len(carried) == 12 and set(carried) <= _HEX else ""
        return KeyNotFound(f"That is a key's secret, not its id: pass the key id{hint}. Treat the secret as "
                           "exposed (it may be in logs now): revoke it and make a new key.", param="key_id")
    return KeyNotFound("No key has this id (GET /admin/keys?include_revoked=true lists them).", param="key_id")


def well_formed_id(key_id: str) -> bool:
    return len(key_id) == 12 and set(key_id) <= _HEX


def _name(kind: str, value: str) -> str:
    """``value`` if the key store takes it as a ``kind`` name; the refusal does not quote it."""
    try:
        return validate_name(kind, value)
    except ValueError:
        raise InvalidField(f"'{kind}' must be 1-{MAX_NAME} letters, digits or . _ @ - (starting with a letter "
                           "or digit).", param=kind) from None


def _note(note: str | None) -> str | None:
    if note is not None and (len(note) > MAX_NOTE or "\x00" in note):
        raise InvalidField(f"'note' must be at most {MAX_NOTE} characters, with no NUL character.", param="note")
    return note


class KeyAdmin:
    """What one admin may do to keys; construct it for a non-admin and it refuses (:class:`NotAdmin`)."""

    def __init__(self, store: KeyStore, actor: Principal, *, policy_dir: Path, signal: Signal | None = None,
                 cache_ttl_s: float = 0.0) -> None:
        if ADMIN_ROLE not in actor.roles:
            raise NotAdmin(f"Only a key with the '{ADMIN_ROLE}' role may administer keys.")
        self.store = store
        self.actor = actor
        self.policy_dir = policy_dir
        self._signal = signal
        self._cache_ttl_s = cache_ttl_s

    @property
    def by(self) -> str:
        """The ``by`` of this admin's entries: its key id (public), never its user name alone."""
        return f"key:{self.actor.key_id}"

    # -- reads ---------------------------------------------------------------

    async def page(self, *, cursor: str | None, limit: int, include_revoked: bool) -> KeyPage:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidField(f"'limit' must be from 1 to {MAX_PAGE_SIZE}.", param="limit")
        if cursor is not None and not well_formed_id(cursor):
            raise UnknownCursor("'cursor' must be the next_cursor of a previous page.", param="cursor")
        found = await self._store(self.store.page, after=cursor, limit=limit, include_revoked=include_revoked)
        if found is None:
            raise UnknownCursor("'cursor' names no key: pass the next_cursor of a previous page.", param="cursor")
        keys, has_more = found
        return KeyPage(keys, has_more, keys[-1].key_id if has_more else None)

    async def get(self, key_id: str) -> ApiKey:
        row = await self._store(self.store.get, key_id) if well_formed_id(key_id) else None
        if row is None:
            raise _not_found(key_id)
        return row

    # -- changes -------------------------------------------------------------

    async def create(self, user: str, *, team: str | None, roles: list[str], note: str | None = None) -> IssuedKey:
        """A new key; its secret is in the answer only (stored as a hash, never in the entry)."""
        _name("user", user)
        if team is not None:
            _name("team", team)
        try:
            refuse_reserved("user", user)
            if team is not None:
                refuse_reserved("team", team)
        except ReservedName as exc:
            raise InvalidField(f"'{exc.kind}' {exc.why}.", param=exc.kind) from None
        wanted = await self._known(roles)
        try:
            return await self._store(self.store.create, user, team=team, roles=wanted, note=_note(note), by=self.by)
        except NameLookAlike as exc:
            raise InvalidField(f"'{exc.kind}' {exc.why}.", param=exc.kind) from None

    async def revoke(self, key_id: str) -> KeyChange:
        """Revoke (idempotent: an already revoked key is answered as it is, writing nothing).

        The gateways are told again on a repeat: the call that revoked it may
        have answered with a warning that they were not (Redis down), and the
        retry is how an admin mends that; a repeated signal only drops a cache
        entry.
        """
        row = await self.get(key_id)
        if row.revoked_at is not None:
            return KeyChange(row, changed=False, warning=await self._told(key_id))
        try:
            done = await self._store(self.store.revoke, key_id, by=self.by, keep_role=ADMIN_ROLE)
        except LastHolderError:
            raise LastAdmin(f"This is the last live key with the '{ADMIN_ROLE}' role: revoking it would leave "
                            "nobody able to administer keys. Create another admin key first.",
                            param="key_id") from None
        return KeyChange(await self.get(key_id), changed=done, warning=await self._told(key_id))

    async def set_roles(self, key_id: str, roles: list[str]) -> KeyChange:
        """Give a live key exactly ``roles``."""
        wanted = await self._known(roles)
        row = await self.get(key_id)
        if row.revoked_at is not None:
            raise KeyIsRevoked("This key is revoked; its roles cannot change (create a new key).", param="key_id")
        try:
            change = await self._store(self.store.set_roles, key_id, wanted, by=self.by, keep_role=ADMIN_ROLE)
        except LastHolderError:
            raise LastAdmin(f"This is the last live key with the '{ADMIN_ROLE}' role: taking the role away would "
                            "leave nobody able to administer keys. Give it to another key first.",
                            param="roles") from None
        if change is None:  # revoked meanwhile
            raise KeyIsRevoked("This key is revoked; its roles cannot change (create a new key).", param="key_id")
        warning = await self._told(key_id) if change.changed else None
        return KeyChange(await self.get(key_id), changed=change.changed, warning=warning)

    # -- helpers -------------------------------------------------------------

    async def _known(self, roles: list[str]) -> list[str]:
        if len(roles) > MAX_ROLES:
            raise InvalidField(f"'roles' may hold at most {MAX_ROLES} roles.", param="roles")
        for role in roles:
            _name("role", role)
        try:
            known = await anyio.to_thread.run_sync(policy_roles, self.policy_dir)
        except RolesUnreadable as exc:
            raise KeysUnavailable(f"The roles cannot be checked: {exc}.") from None
        try:
            return checked_roles(roles, known, none_given="'roles' is empty")
        except UnknownRoles as exc:
            raise UnknownRole(f"{exc}.", param="roles") from None

    async def _told(self, key_id: str) -> str | None:
        """Signal the change; the admin's warning when the other gateways could not be told."""
        if self._signal is None:
            return None
        failure = await self._signal(key_id)
        if failure is None:
            return None
        ttl = self._cache_ttl_s
        return (f"The change is made, but the other gateways were not told: {failure}. This gateway refuses the "
                f"key's old access now; another that served the key in the last {ttl:g} s may serve it as before "
                f"for up to {ttl:g} s more (GOVGATE_AUTH_CACHE_TTL_S).")

    async def _store(self, call: Callable, *args, **kwargs):
        """A key store call on a worker thread (the ORM blocks).

        A change that fails is not made (the store writes the row and its
        entry in one transaction), so retrying is safe.
        """
        try:
            return await anyio.to_thread.run_sync(lambda: call(*args, **kwargs))
        except KeyStoreError:
            raise KeysUnavailable("The key store (database) cannot be read or written right now; a change "
                                  "that could not be written was not made.") from None
