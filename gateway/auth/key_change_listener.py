"""The gateway's subscription to key changes, and the lease it gives the principal cache.

One pub/sub connection per gateway process, on its own (not the result
waiter's: the two fail and recover independently). A message drops that key
from the cache. The cache may serve only while this subscription provably
works, so the listener PINGs on the subscribed connection every
``ping_interval_s``: Redis answers in order, so a PONG proves that every
change published before its PING has already been received, and it renews
the cache's lease until that PING's time plus ``grace_s``. When anything goes
wrong (an error, no PONG within ``grace_s``, or redis-py quietly re-making
the subscription after a reconnect, which it announces with a second
"subscribe" confirmation) the lease is revoked at once and the cache
emptied: until a new subscription answers a PING, every request asks the
database. So a revocation is seen at once while Redis is up, and cannot be
missed while it is not.

The same messages end the requests of a revoked key that this gateway has in
flight (``on_change``: :meth:`gateway.auth.revocations.AdmittedKeys.changed`),
and a subscription that answers again after a loss has every key with
requests in flight looked at (``on_resumed``), as a change may have been
missed meanwhile. So the listener runs even when the cache is off
(``GOVGATE_AUTH_CACHE_TTL_S=0``) if it has those to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Callable

import redis.asyncio as aioredis

from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL
from gateway.auth.principal_cache import PrincipalCache
from gateway.task_stop import stop_task

log = logging.getLogger(__name__)


class SubscriptionLost(ConnectionError):
    """The subscription can no longer prove it receives every change."""


class KeyChangeListener:
    """Keeps ``cache`` in step with :data:`KEYS_CHANGED_CHANNEL` and holds its lease."""

    def __init__(self, client: aioredis.Redis, cache: PrincipalCache, *, ping_interval_s: float = 0.5,
                 grace_s: float = 2.0, on_change: Callable[[str], None] | None = None,
                 on_resumed: Callable[[], None] | None = None) -> None:
        if grace_s <= ping_interval_s:
            raise ValueError("grace_s must be longer than ping_interval_s, or the lease lapses between pings")
        self._client = client
        self._cache = cache
        self._ping_interval_s = ping_interval_s
        self._grace_s = grace_s
        self._on_change = on_change
        self._on_resumed = on_resumed
        self._task: asyncio.Task | None = None
        #: Subscriptions that answered a PING (each one began with an empty cache).
        self.sessions = 0
        self._down_logged = False

    async def start(self) -> None:
        if self._cache.enabled or self._on_change is not None:
            self._task = asyncio.create_task(self._run(), name="govgate-key-changes")

    async def aclose(self) -> None:
        await stop_task(self._task)
        self._cache.revoke_lease()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            before = self.sessions
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any redis-py failure
                if self.sessions != before or not self._down_logged:
                    log.warning("principal cache off (every request asks the database) until the key-change "
                                "subscription is back: %s: %s", type(exc).__name__, exc)
                    self._down_logged = True
            if self.sessions != before:
                backoff = 0.1  # that session worked: try again soon
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        """One subscription, from SUBSCRIBE until it fails; the lease never outlives it."""
        clock = self._cache.clock
        pubsub = self._client.pubsub()
        pings: deque[float] = deque()  # send times of PINGs not yet answered
        subscribed = answered = False
        try:
            await pubsub.subscribe(KEYS_CHANGED_CHANNEL)
            next_ping = clock()
            while True:
                now = clock()
                if now >= next_ping:
                    if pings and now - pings[0] > self._grace_s:
                        raise SubscriptionLost(f"no answer to a PING within {self._grace_s:g}s")
                    await pubsub.ping()
                    pings.append(now)
                    next_ping = now + self._ping_interval_s
                message = await pubsub.get_message(timeout=max(0.0, next_ping - clock()))
                if message is None:
                    continue
                kind = message["type"]
                kind = kind.decode() if isinstance(kind, bytes) else kind
                if kind == "subscribe":
                    if subscribed:
                        raise SubscriptionLost("redis-py re-made the subscription after a reconnect; "
                                               "changes may have been missed")
                    subscribed = True  # the lease was revoked when the last session ended (or never held)
                elif kind == "pong" and pings:
                    sent = pings.popleft()
                    if subscribed:
                        if not answered:
                            answered = True
                            self.sessions += 1
                            if self._down_logged:
                                log.warning("principal cache back on: the key-change subscription answers")
                            if self._on_resumed is not None:  # what was missed while no session answered
                                self._on_resumed()
                        self._cache.renew_lease(sent + self._grace_s)
                elif kind == "message":
                    data = message["data"]
                    key_id = data.decode() if isinstance(data, bytes) else str(data)
                    self._cache.forget_key(key_id)
                    if self._on_change is not None:
                        self._on_change(key_id)
        finally:
            self._cache.revoke_lease()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
