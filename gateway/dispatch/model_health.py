"""Which models cannot be served now: no live worker, and its last worker said why it could not load it.

Without this a request for a model whose worker cannot load (a truncated
file, a file of the wrong architecture) was queued and ended 504 after the
whole request timeout with "the model did not answer", the reason only in a
worker's log. A worker whose load fails writes the reason under
``govgate:model-failed:<model>`` (:mod:`workers.contract.liveness`), one that
loads deletes it; a gateway reads those keys and the live workers' set once a
second in the background (two commands, never one per request) and admission
refuses such a model's requests at once with 503 ``model_unavailable`` and
the reason, audited like every refusal. A model with a live worker is served
whatever the key says; one without a worker and without a key (a worker
being restarted, or none started yet) is queued as before, so a transient
restart does not refuse requests it would have served.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.task_stop import stop_task
from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY, live_counts, model_failed_key

log = logging.getLogger(__name__)

#: How often the view is read again.
REFRESH_S = 1.0


class ModelHealth:
    """The models that cannot be served now and why, refreshed every :data:`REFRESH_S` (call :meth:`start`)."""

    def __init__(self, redis: aioredis.Redis, models: list[str], refresh_s: float = REFRESH_S) -> None:
        self._redis = redis
        self._models = list(models)
        self._refresh_s = refresh_s
        self._failed: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def unservable(self, model: str) -> str | None:
        """Why ``model`` cannot be served now, or None (served, or it may be soon: queue it)."""
        return self._failed.get(model)

    async def refresh(self) -> None:
        """Read the failed keys and the live workers once; a Redis that cannot answer changes nothing here
        (admission's own Redis calls fail the request closed then)."""
        if not self._models:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.mget([model_failed_key(model) for model in self._models])
                pipe.eval(LIVE_SCRIPT, 1, WORKERS_KEY)
                reasons, members = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("model health not read: %s", exc)
            return
        live = live_counts(members)
        failed: dict[str, str] = {}
        for model, reason in zip(self._models, reasons):
            if reason is not None and not live.get(model):
                failed[model] = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        for model in failed.keys() - self._failed.keys():
            log.warning("model %s cannot be served (no live worker): %s", model, failed[model])
        self._failed = failed

    async def start(self) -> None:
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="govgate-model-health")

    async def aclose(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
