"""``GET /healthz`` (is this process up?) and ``GET /readyz`` (can it serve?); no key needed.

Both answer ``HEAD`` too, with the status and headers ``GET`` would give
and no body: load balancers and uptime checkers (HAProxy's ``option
httpchk HEAD``, many cloud probes) ask with ``HEAD``, and a 405 there marked
a healthy gateway down.

Two questions with two answers, as orchestrators ask them: a failing
liveness probe restarts the process, a failing readiness probe takes it out
of the load balancer. A gateway whose Redis is down must not be restarted
in a loop (restarting does not bring Redis back), so ``/healthz`` checks
nothing but that the event loop answers; ``/readyz`` checks what a request
needs — the database (a PostgreSQL standby or read-only server answers
reads and refuses every append), Redis (one that takes writes: a full one answers
reads and refuses every request), a loaded policy, and a live worker for
every model (a model without one would only queue requests until they time
out) — and answers 503 naming what is missing; also while the gateway is
stopping (``gateway/drain.py``: it refuses new requests then).
"""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, MediaType, Request, Response, get, head
from litestar.datastructures import State
from sqlalchemy.exc import SQLAlchemyError

from audit import write_refusal
from gateway import urls
from gateway.api.openapi import HEALTH_OPERATION, READY_OPERATION
from gateway.api.operator_view import shows_models
from gateway.observability.cluster import read_cluster

#: Longest the database check waits (the connection pool's own timeout may be longer).
DATABASE_TIMEOUT_S = 2.0
#: Longest the policy engine's check waits (OPA's health check has a second of its own).
POLICY_TIMEOUT_S = 1.5


class HealthController(Controller):
    tags = ["operations"]

    @get(urls.HEALTH, summary="Liveness: the gateway process is up", operation_class=HEALTH_OPERATION,
         operation_id="health")
    async def health(self) -> Response:
        return Response({"status": "ok"})

    @head(urls.HEALTH, include_in_schema=False)
    async def health_head(self) -> Response[None]:
        return _head_of(200)

    @get(urls.READY, summary="Readiness of the gateway and its dependencies", operation_class=READY_OPERATION,
         operation_id="ready")
    async def ready(self, request: Request, state: State) -> Response:
        per_model = await shows_models(request, state)
        body = await _readiness(state)
        return Response(body if per_model else _without_models(body), status_code=_ready_status(body))

    @head(urls.READY, include_in_schema=False)
    async def ready_head(self, request: Request, state: State) -> Response[None]:
        """The same checks as ``GET /readyz``: a load balancer's HEAD probe must see a 503 too."""
        await shows_models(request, state)  # a wrong credential is refused as on GET
        return _head_of(_ready_status(await _readiness(state)))


def _head_of(status: int) -> Response[None]:
    """A HEAD answer: GET's status and content type, no body."""
    return Response(None, status_code=status, headers={"Content-Type": MediaType.JSON.value})


def _ready_status(body: dict[str, Any]) -> int:
    return 503 if body["missing"] else 200


def _without_models(body: dict[str, Any]) -> dict[str, Any]:
    """``/readyz``'s body with no model name: the same status and checks; the models without a live worker
    counted, ``missing`` saying ``workers`` once."""
    unserved = [item.partition(":")[2] for item in body["missing"] if item.startswith("workers:")]
    missing = [item for item in body["missing"] if not item.startswith("workers:")] + (["workers"] if unserved else [])
    checks = dict(body["checks"])
    failing = sum(1 for model in unserved if body["workers"].get(model))
    if unserved:
        checks["workers"] = "error: " + "; ".join(
            ([f"no live worker for {len(unserved) - failing} of {len(body['models'])} models"]
             if len(unserved) > failing else []) +
            ([f"every live worker of {failing} of {len(body['models'])} models fails its jobs"] if failing else []))
    return {**body, "checks": checks, "missing": missing, "workers": {}, "workers_failing": {}, "models": []}


async def _readiness(state: State) -> dict[str, Any]:
    """``/readyz``'s body: each check, what is missing, the live workers, the policy revision, the models."""
    components = state.components
    models = components.registry.names()
    checks = {"gateway": "ok", "database": "ok", "redis": "ok", "policy": "ok", "workers": "ok"}
    missing: list[str] = []
    try:
        with anyio.fail_after(DATABASE_TIMEOUT_S):
            refusal = await anyio.to_thread.run_sync(_ping_database, components.db_engine,
                                                     abandon_on_cancel=True)
        if refusal is not None:
            checks["database"] = f"error: refuses writes: {refusal}"
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    except TimeoutError:
        checks["database"] = f"error: no answer within {DATABASE_TIMEOUT_S:g}s"
    cluster = await read_cluster(components.redis, models, probe_write=True)
    if cluster.write_refused is not None:
        checks["redis"] = f"error: refuses writes: {cluster.write_refused}"
    if cluster.error is not None:
        checks["redis"] = f"error: {cluster.error}"
        checks["workers"] = "error: unknown (Redis unreadable)"
    else:
        idle = [model for model in models if not cluster.workers.get(model)]
        failing = [model for model in models if cluster.workers.get(model) and not cluster.serving(model)]
        problems = ([f"no live worker for {', '.join(idle)}"] if idle else []) + [
            f"every live worker of {model} fails its jobs ({cluster.failing[model].reason})" for model in failing]
        if problems:
            checks["workers"] = "error: " + "; ".join(problems)
            missing.extend(f"workers:{model}" for model in models if model in idle or model in failing)
    if not components.policy.revision:
        checks["policy"] = "error: not loaded"
    else:
        problem = await _policy_problem(components.policy)
        if problem is not None:
            checks["policy"] = f"error: {problem}"
    drain = getattr(state, "drain", None)
    checks["gateway"] = "ok" if drain is None or not drain.draining else \
        "error: stopping (new requests are refused; those in flight are finishing)"
    missing[:0] = [name for name in ("gateway", "database", "redis", "policy") if checks[name] != "ok"]
    return {
        "status": "unavailable" if missing else "ready",
        "checks": checks,
        "missing": missing,
        "workers": cluster.workers,
        # Live workers that fail every job for a reason of their own (workers/contract/failing.py), per model.
        "workers_failing": {model: found.workers for model, found in cluster.failing.items()},
        "policy_revision": components.policy.revision,
        # Ready all the same (the running revision serves), but a restart would refuse to start on the folder
        # as it is (probe q3 F3); only the revision: the reason, in the log, may name rules and files.
        "policy_rejected_revision": _rejected_revision(components.policy),
        "models": models,
    }


def _rejected_revision(policy: Any) -> str | None:
    """The revision the policy folder holds that the last reload refused, or None."""
    refused = getattr(policy, "rejected", None)
    return None if refused is None else refused[0]


async def _policy_problem(policy: Any) -> str | None:
    """What keeps the policy engine from deciding now (OPA down or holding another revision, no evaluator)."""
    check = getattr(policy, "readiness_problem", None)
    if check is None:
        return None
    try:
        with anyio.fail_after(POLICY_TIMEOUT_S):
            return await check()
    except TimeoutError:
        return f"no answer within {POLICY_TIMEOUT_S:g}s"


def _ping_database(engine) -> str | None:
    """Ask the database for a reply, and whether it would take writes (None: nothing says it would not)."""
    with engine.connect() as connection:
        return write_refusal(connection)
