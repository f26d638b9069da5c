"""One-time forms: a form whose second sending would do a second, different thing (make another key).

The keys page's create form is answered with a page, not a redirect, since
the new key's secret is shown on it once and kept nowhere. So reloading that
page (or going back to it) makes the browser send the form again, which would
make a second key whose secret nobody ever sees. The form carries a random
id; the first post with it claims it in Redis (``SET NX``, for an hour) and a
second one is refused with a page that says the key was made the first time.
A post without an id (a hand-made client) is not protected and not refused;
a malformed id is a form from elsewhere, refused like a bad CSRF token.
Redis not answering is the console's 503, as for a session.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.console.csrf import CsrfRefused
from gateway.console.sessions import SessionStoreDown

#: The form field, and the Redis key prefix of the ids already used.
FIELD: Final = "form_id"
PREFIX: Final = "govgate:console:form:"
#: How long a used id is remembered (a page left open longer than this is sent as new).
TTL_S: Final = 3600
_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")


class FormResent(Exception):
    """This form was sent before: what it asked for was done then."""


def new_id() -> str:
    return secrets.token_urlsafe(32)


async def claim(client: aioredis.Redis, value: object) -> None:
    """Mark the form ``value`` as used; :class:`FormResent` if it already was."""
    if value is None:
        return
    if not isinstance(value, str) or not _ID.match(value):
        raise CsrfRefused
    try:
        first = await client.set(PREFIX + value, "1", nx=True, ex=TTL_S)
    except (RedisError, OSError) as exc:
        raise SessionStoreDown(str(exc)) from None
    if not first:
        raise FormResent
