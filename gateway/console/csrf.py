"""CSRF protection for every console form.

Signed-in forms carry the session's own token (a synchronizer token kept in
Redis with the session, :mod:`gateway.console.sessions`); the sign-in form,
which comes before any session, carries a token that must equal the one in
a short-lived cookie set with the form (double submit). Either way a post
whose token is missing or wrong is refused (403) before anything is read
or written. The cookies are also SameSite=Strict, so a browser does not send
them with another site's form in the first place; the token is the check
that does not depend on the browser.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

#: The form field every console form carries.
FIELD: Final = "csrf_token"


class CsrfRefused(Exception):
    """A form post without the right token."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check(expected: str | None, given: object) -> None:
    """Refuse unless ``given`` is exactly ``expected`` (compared in constant time)."""
    if not expected or not isinstance(given, str) or not given:
        raise CsrfRefused
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfRefused
