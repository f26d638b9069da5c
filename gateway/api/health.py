"""``GET /healthz``: can this gateway serve right now? (no key needed)

Checks what a request needs — the database, Redis and a loaded policy — and
answers 503 when any is missing, so a load balancer stops sending traffic to
a gateway that would only refuse it.
"""

from __future__ import annotations

import anyio
from litestar import Controller, Response, get
from litestar.datastructures import State
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from gateway import urls
from gateway.api.openapi import HEALTH_OPERATION


class HealthController(Controller):
    tags = ["operations"]

    @get(urls.HEALTH, summary="Readiness of the gateway and its dependencies", operation_class=HEALTH_OPERATION,
         operation_id="health")
    async def health(self, state: State) -> Response:
        components = state.components
        checks = {"database": "ok", "redis": "ok", "policy": "ok"}
        try:
            await anyio.to_thread.run_sync(_ping_database, components.db_engine)
        except SQLAlchemyError as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            with anyio.fail_after(2):
                await components.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        if not components.policy.revision:
            checks["policy"] = "error: not loaded"
        healthy = all(v == "ok" for v in checks.values())
        body = {
            "status": "ok" if healthy else "unavailable",
            "checks": checks,
            "policy_revision": components.policy.revision,
            "models": components.registry.names(),
        }
        return Response(body, status_code=200 if healthy else 503)


def _ping_database(engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
