"""Telling a Redis that lost its data from one that only dropped a connection.

A gateway's reply channel reconnects after any break: a network blip, a
Redis restarted from its append-only file, or a Redis restarted empty (a lost
volume, a failover to a copy that never had the data). Only the
last loses the jobs still waiting in the queue, whose clients would otherwise
wait their whole request timeout for an outcome no worker will ever send
(probe s57 D4). Redis's own ``run_id`` changes at every restart, data kept or
not, so it cannot tell them apart; a key can: the first gateway writes a
random token under :data:`EPOCH_KEY` (``SET NX``, no expiry), every gateway
remembers the token it found, and a reconnect that finds another token, or
none, means the data it knew is gone. One ``GET`` per reconnect; nothing on
the request path.
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis

#: The token of the data Redis holds; written once, never expires, replaced only after it was lost.
EPOCH_KEY = "govgate:redis-epoch"


class RedisEpoch:
    """The token this gateway last saw under :data:`EPOCH_KEY`."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._known: bytes | None = None

    async def _current(self) -> bytes | None:
        """The token Redis holds, writing a new one if it holds none (raises ``RedisError``/``OSError``)."""
        await self._client.set(EPOCH_KEY, secrets.token_hex(16), nx=True)
        return await self._client.get(EPOCH_KEY)

    async def note(self) -> None:
        """Remember the token Redis holds now (at the gateway's start)."""
        self._known = await self._current()

    async def lost(self) -> bool:
        """Whether Redis lost the data this gateway knew since :meth:`note` or the last call, which
        adopts the token it holds now. False when no token was known (nothing to compare with)."""
        current = await self._client.get(EPOCH_KEY)
        if current is not None and current == self._known:
            return False
        if current is None:
            current = await self._current()
        lost, self._known = self._known is not None, current
        return lost
