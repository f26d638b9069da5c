"""The gateway's heartbeat: it says every few seconds that it still waits on its reply channel.

Workers ask it before they generate a job that waited in the queue, so a
gateway killed with jobs queued does not have them generated for nobody
(the protocol, and why not ``PUBSUB NUMSUB``: :mod:`workers.contract.gateway_liveness`).
One command per gateway every :data:`~workers.contract.gateway_liveness.GATEWAY_BEAT_INTERVAL_S`,
none per request, on a connection of its own (``gateway/components.py``): the shared pool can be
all lent out in a burst, and a beat that waits for it is a beat missed. A clean stop scores the
gateway "gone now", after its drain has ended or taken back its jobs.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.task_stop import stop_task
from workers.contract.gateway_liveness import (GATEWAY_BEAT_INTERVAL_S, GATEWAY_BEAT_SCRIPT, GATEWAY_BEAT_TTL_S,
                                               GATEWAY_FORGET_AFTER_S, GATEWAYS_KEY)

log = logging.getLogger(__name__)


class GatewayBeat:
    """Refreshes this gateway's member of :data:`GATEWAYS_KEY` until closed (call :meth:`start`)."""

    def __init__(self, redis: aioredis.Redis, reply_channel: str,
                 interval_s: float = GATEWAY_BEAT_INTERVAL_S, ttl_s: int = GATEWAY_BEAT_TTL_S) -> None:
        self._redis = redis
        self._channel = reply_channel
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def beat(self, ttl_s: int | None = None) -> bool:
        """Say this gateway is there for ``ttl_s`` more seconds (0: gone now); False if Redis refused."""
        try:
            await self._redis.eval(GATEWAY_BEAT_SCRIPT, 1, GATEWAYS_KEY, self._channel,
                                   self._ttl_s if ttl_s is None else ttl_s, GATEWAY_FORGET_AFTER_S)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("gateway heartbeat cannot reach Redis (%s): workers may take this gateway's queued "
                            "jobs for a dead gateway's after %ds", exc, self._ttl_s)
            self._failing = True
            return False
        if self._failing:
            log.warning("gateway heartbeat reaches Redis again")
        self._failing = False
        return True

    async def start(self) -> None:
        await self.beat()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="govgate-gateway-beat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.beat()

    async def aclose(self) -> None:
        """Stop beating, and say this gateway is gone (its drain is over: nothing it queued waits for it)."""
        await stop_task(self._task)
        self._task = None
        await self.beat(ttl_s=0)
