"""Who is using the console: sign-in with a key, the session's key re-checked on every request, sign-out.

Keys holding ``reviewer``, ``auditor`` or ``admin`` get in, and each sees
the pages of its roles: the review pages need ``reviewer`` or ``auditor``
(an admin-only key gets the console's 403 page there, since the review API
lets an admin read only its own entries, ``gateway/review/access.py``, and
the console is a view of that API, not a way around it); the keys page
needs ``admin`` (:mod:`gateway.console.keys`).

The session cookie is HttpOnly (no script reads it), SameSite=Strict and
scoped to ``/console``. Strict rather than Lax: a link from a chat or a
ticket then opens the sign-in page instead of the page itself, but no other
site can make a signed-in browser load a request page, and loading one is
not harmless here, since showing a prompt writes a ``payload_read`` entry
in the reviewer's name. ``Secure`` when ``GOVGATE_CONSOLE_SECURE_COOKIES``
is set or the request came over https.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

import anyio.to_thread
from litestar import Request
from litestar.datastructures import Cookie, State

from gateway import urls
from gateway.auth import ApiKey, Principal
from gateway.console.render import ADMIN_NAV, REVIEW_NAV
from gateway.console.sessions import Session, SessionStore
from gateway.keys_admin import ADMIN_ROLE
from gateway.review.access import AUDITOR, REVIEWER, Access
from gateway.settings import Settings

SESSION_COOKIE: Final = "govgate_console"
#: The sign-in form's double-submit CSRF cookie (before there is a session).
SIGN_IN_COOKIE: Final = "govgate_console_sign_in"
#: Roles that open the review pages; with the admin's, the roles that open the console at all.
REVIEW_ROLES: Final = (REVIEWER, AUDITOR)
CONSOLE_ROLES: Final = (*REVIEW_ROLES, ADMIN_ROLE)


class PageRefused(Exception):
    """A signed-in key on a page its roles do not open: the console's 403 page, with the nav it may use."""

    def __init__(self, user: Reviewer, message: str) -> None:
        super().__init__(message)
        self.user = user
        self.message = message


class SignInRequired(Exception):
    """No live session (or its key is no longer good enough): back to the sign-in page, saying why."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "sign in")
        self.reason = reason


@dataclass(frozen=True)
class Reviewer:
    """The signed-in person: their key's principal as of this request, and their session.

    Named for the review pages it was made for; on the keys page it is an admin.
    """

    principal: Principal
    session: Session

    @property
    def access(self) -> Access:
        return Access(self.principal)

    @property
    def may_act(self) -> bool:
        return self.access.may_act

    @property
    def may_review(self) -> bool:
        return may_review(self.principal)

    @property
    def may_admin(self) -> bool:
        return ADMIN_ROLE in self.principal.roles

    @property
    def role(self) -> str:
        """The badge beside the name: the review role if any, else ``admin``."""
        if self.may_review:
            return REVIEWER if self.may_act else AUDITOR
        return ADMIN_ROLE

    @property
    def badges(self) -> list[str]:
        """Every console role the key holds, as badges (a reviewer who is also an admin shows both)."""
        return [self.role, *([ADMIN_ROLE] if self.may_admin and self.role != ADMIN_ROLE else [])]

    @property
    def nav(self) -> tuple[tuple[str, str], ...]:
        """The pages this key may use: the nav shows nothing it would be refused."""
        return (REVIEW_NAV if self.may_review else ()) + (ADMIN_NAV if self.may_admin else ())

    @property
    def home(self) -> str:
        """Where the brand link and sign-in lead: the review queue, or the keys page for an admin-only key."""
        return urls.CONSOLE_QUEUE if self.may_review else urls.CONSOLE_KEYS


def may_use_console(principal: Principal) -> bool:
    return any(role in principal.roles for role in CONSOLE_ROLES)


def may_review(principal: Principal) -> bool:
    return any(role in principal.roles for role in REVIEW_ROLES)


def console_principal(row: ApiKey | None) -> Principal | None:
    """The principal of a live key that may use the console, else None."""
    if row is None or row.revoked_at is not None:
        return None
    principal = Principal(id=row.user, team=row.team, roles=tuple(row.roles), key_id=row.key_id)
    return principal if may_use_console(principal) else None


def session_store(state: State) -> SessionStore:
    settings: Settings = state.components.settings
    return SessionStore(state.components.redis, idle_s=settings.console_idle_timeout_s)


async def provide_reviewer(request: Request, state: State) -> Reviewer:
    """The signed-in reviewer or auditor; :class:`SignInRequired` or (a signed-in admin-only key)
    :class:`PageRefused` otherwise."""
    user = await provide_user(request, state)
    if not user.may_review:
        raise PageRefused(user, "This page is for keys with the 'reviewer' or 'auditor' role; this key may use "
                          "the keys page only.")
    return user


async def provide_user(request: Request, state: State) -> Reviewer:
    """Whoever is signed in, with any console role; :class:`SignInRequired` otherwise.

    The key is read again by id on every request (a primary-key read, on a
    worker thread), so revoking it or taking its role away ends the session
    at the next click, on every replica. ``KeyStoreError`` and
    ``SessionStoreDown`` propagate: the console refuses, it does not guess.
    """
    store = session_store(state)
    token = request.cookies.get(SESSION_COOKIE)
    session = await store.load(token)
    if session is None:
        raise SignInRequired("Your session has ended; sign in again." if token else None)
    row = await anyio.to_thread.run_sync(state.components.keys.get, session.key_id)
    principal = console_principal(row)
    if principal is None:
        await store.end(token)
        raise SignInRequired("Your key was revoked or no longer holds a console role.")
    return Reviewer(principal, session)


def cookie(request: Request, name: str, value: str, *, max_age: int | None = None) -> Cookie:
    """A console cookie: HttpOnly, SameSite=Strict, path ``/console``, Secure as configured."""
    settings: Settings = request.app.state.components.settings
    secure = settings.console_secure_cookies or request.url.scheme == "https"
    return Cookie(key=name, value=value, path=urls.CONSOLE, httponly=True, samesite="strict", secure=secure,
                  max_age=max_age)


def safe_next(value: object) -> str:
    """Where to go after signing in: a console path only (never another site), else the queue."""
    if not isinstance(value, str) or not value.startswith(urls.CONSOLE + "/") or "\\" in value:
        return urls.CONSOLE_QUEUE
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith("//"):
        return urls.CONSOLE_QUEUE
    # A browser resolves "." and ".." (also written %2e%2e) before it asks: /console/../v1 would leave the console.
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return urls.CONSOLE_QUEUE
    return value
