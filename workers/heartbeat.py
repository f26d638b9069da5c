"""The worker's heartbeat: its main process says every few seconds that it serves its model.

Runs in a daemon thread of the worker's main process (started when Celery
says the worker is ready, stopped as it shuts down), not in the pool
processes, which may be deep in a generation; the main process is the one
that consumes the queue, so while it beats, the model's jobs are taken.
The protocol is :mod:`workers.contract.liveness`.
"""

from __future__ import annotations

import logging
import threading

import redis

from workers.contract.liveness import BEAT_SCRIPT, HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, WORKERS_KEY, slot_members

log = logging.getLogger(__name__)


class Heartbeat:
    """Refreshes one worker's members of the live-workers set until stopped, then removes them.

    ``slots``: the jobs the worker runs at once (its pool's concurrency), one member each
    (:func:`workers.contract.liveness.slot_members`).
    """

    def __init__(self, redis_url: str, model: str, worker: str, slots: int = 1) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._beat = self._client.register_script(BEAT_SCRIPT)
        self._members = slot_members(model, worker, slots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="govgate-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self._beat(keys=[WORKERS_KEY], args=[self._members[0], HEARTBEAT_TTL_S, *self._members[1:]])
                if failing:
                    log.warning("heartbeat reaches Redis again")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("heartbeat cannot reach Redis (%s); gateways will not count this worker", exc)
                failing = True
            if self._stop.wait(HEARTBEAT_INTERVAL_S):
                return

    def stop(self) -> None:
        """Stop beating and leave the set at once (gateways stop counting this worker now)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_INTERVAL_S + 6)
        try:
            self._client.zrem(WORKERS_KEY, *self._members)
        except redis.RedisError as exc:
            log.warning("could not leave the live-workers set (gone within %ds anyway): %s", HEARTBEAT_TTL_S, exc)
        self._client.close()
