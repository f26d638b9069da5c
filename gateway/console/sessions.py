"""Console sessions: server-side, in Redis, so every gateway replica sees the same ones and sign-out is final.

The browser holds only a random token (256 bits) in an HttpOnly cookie;
Redis holds, under the token's SHA-256 (so someone reading Redis cannot
replay a session), the key id it was opened with, its CSRF token and when
it began. Never the key's secret: the key is looked up again by id on
every request (:mod:`gateway.console.signin`), so a revoked key is out at once.

The idle timeout is the Redis entry's TTL, renewed on every request; a
session also ends :data:`MAX_AGE_S` after sign-in however busy it is.
When Redis cannot answer, nobody is signed in: :class:`SessionStoreDown`
becomes a 503 page (fail closed), never a session taken on trust.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

#: Redis key prefix of the sessions.
PREFIX: Final = "govgate:console:session:"
#: A session ends this long after sign-in, active or not.
MAX_AGE_S: Final = 12 * 3600
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")


class SessionStoreDown(RuntimeError):
    """Redis did not answer: the console refuses rather than guess who is signed in."""


@dataclass(frozen=True)
class Session:
    """One signed-in browser: the cookie's token (never stored), the key id, the CSRF token."""

    token: str
    key_id: str
    csrf: str
    started: float


def _name(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Opens, reads (renewing the idle timeout) and ends sessions in Redis."""

    def __init__(self, client: aioredis.Redis, *, idle_s: float, clock=time.time) -> None:  # noqa: ANN001
        self.client = client
        self.idle_ms = int(idle_s * 1000)
        self.clock = clock

    async def open(self, key_id: str) -> Session:
        """A new session (always a new token: a token known before sign-in is never promoted)."""
        session = Session(secrets.token_urlsafe(32), key_id, secrets.token_urlsafe(32), self.clock())
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(_name(session.token), mapping={"key_id": key_id, "csrf": session.csrf,
                                                         "started": repr(session.started)})
                pipe.pexpire(_name(session.token), self.idle_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise SessionStoreDown(str(exc)) from None
        return session

    async def load(self, token: str | None) -> Session | None:
        """The live session of this cookie value, its idle timeout renewed; None if none."""
        if not token or not _TOKEN.match(token):
            return None
        name = _name(token)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(name)
                pipe.pexpire(name, self.idle_ms)
                fields, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise SessionStoreDown(str(exc)) from None
        fields = {_text(k): _text(v) for k, v in fields.items()}
        try:
            session = Session(token, fields["key_id"], fields["csrf"], float(fields["started"]))
        except (KeyError, ValueError):
            return None
        if self.clock() - session.started > MAX_AGE_S:
            await self.end(token)
            return None
        return session

    async def end(self, token: str | None) -> None:
        """Sign out: the session is gone for every replica."""
        if not token or not _TOKEN.match(token):
            return
        try:
            await self.client.delete(_name(token))
        except (RedisError, OSError) as exc:
            raise SessionStoreDown(str(exc)) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
