"""Telling every gateway, from inside one, that a key's access was narrowed (revoked, roles changed).

The CLI's :class:`gateway.auth.key_changes.KeyChangeAnnouncer` publishes
once and warns on failure. Here the change was made by a gateway, which can
do more: it drops the key from its own principal cache first, on its event
loop, whether or not Redis answers (so the gateway that said "revoked"
never serves the key again); then it PUBLISHes on the key-change channel
through its own Redis client, a few times with a short bound on each try,
so a blip does not leave other gateways uninformed. What it cannot fix it
reports: the caller tells the admin how long another gateway may still
serve the key from its cache (``GOVGATE_AUTH_CACHE_TTL_S``), as the CLI does.

That window is narrow: a gateway that cannot reach Redis either holds no
lease and asks the database on every request
(``gateway/auth/key_change_listener.py``), so only a gateway that reaches a
Redis this one could not (a partition) may serve from its cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL
from gateway.auth.principal_cache import PrincipalCache

log = logging.getLogger(__name__)


class KeyChangeSignal:
    """Drops a key from this gateway's cache and publishes its id to the others; returns why it could not."""

    def __init__(self, client: aioredis.Redis, cache: PrincipalCache, *, attempts: int = 3,
                 try_timeout_s: float = 2.0, pause_s: float = 0.2,
                 on_change: Callable[[str], None] | None = None) -> None:
        self._client = client
        self._cache = cache
        #: This gateway's own look at the key's requests in flight (``AdmittedKeys.changed``), made before
        #: the publish, whose echo through its listener may not come (Redis refusing it).
        self._on_change = on_change
        self._attempts = attempts
        self._try_timeout_s = try_timeout_s
        self._pause_s = pause_s

    async def __call__(self, key_id: str) -> str | None:
        """None once the change is published; else the last failure (the change itself stays committed)."""
        self._cache.forget_key(key_id)
        if self._on_change is not None:
            self._on_change(key_id)
        failure = ""
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(self._pause_s)
            try:
                async with asyncio.timeout(self._try_timeout_s):
                    await self._client.publish(KEYS_CHANGED_CHANNEL, key_id)
                return None
            except (RedisError, OSError, TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("key %s changed but the other gateways were not told (%d tries): %s", key_id, self._attempts,
                    failure)
        return f"Redis did not take the key-change signal ({failure})"
