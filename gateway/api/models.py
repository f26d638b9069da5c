"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use, as the policy decides,
with each one's queue as the caller may see it (``gateway/limits/queue_view.py``).

A model the policy does not let this key use is answered exactly like one
that does not exist (404 ``model_not_found``), as the list leaves it out:
a key learns nothing about models it may not use, and OpenAI answers the
same way for models an account cannot access. A completion naming such a
model gets the same answer (``gateway/requests/hidden_models.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from redis.exceptions import RedisError

from gateway import urls
from gateway.api.openapi import MODEL_OPERATION, MODELS_OPERATION, SECURITY
from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.limits.queue_view import ADMIN_ROLE, queue_views
from gateway.policy import POLICY_ERROR, PolicyUnavailable
from gateway.requests.hidden_models import model_not_found, policy_unavailable
from workers.contract.registry import ModelSpec

log = logging.getLogger(__name__)


class ModelsController(Controller):
    tags = ["models"]

    @get(urls.MODELS, summary="List the models this key may use", operation_id="listModels",
         operation_class=MODELS_OPERATION, security=SECURITY)
    async def list_models(self, state: State, principal: NamedDependency[Principal]) -> dict[str, Any]:
        components = state.components
        specs = [components.registry.models[name] for name in components.registry.names()]
        visible = await _visible(state, principal, specs)
        queues = await _queues(state, principal, visible)
        return {"object": "list", "data": [_model_object(spec, queues.get(spec.name)) for spec in visible]}

    @get(urls.MODEL, summary="One model this key may use", operation_id="retrieveModel",
         operation_class=MODEL_OPERATION, security=SECURITY)
    async def retrieve_model(self, state: State, principal: NamedDependency[Principal],
                             model_id: FromPath[str]) -> dict[str, Any]:
        spec = state.components.registry.get(model_id)
        try:
            visible = spec is not None and bool(await _visible(state, principal, [spec]))
        except ApiError as error:
            if error.code != POLICY_ERROR:
                raise
            visible = False  # a model the policy cannot say the key may use: answered as an unknown name
        if not visible:
            raise model_not_found(model_id)
        return _model_object(spec, (await _queues(state, principal, [spec])).get(spec.name))


async def _visible(state: State, principal: Principal, specs: list[ModelSpec]) -> list[ModelSpec]:
    """``specs`` the policy lets ``principal`` use.

    A policy that cannot answer in time is a retryable 503, as for a
    completion, and one whose evaluation fails (a rule conflict, an error)
    is a 403 ``policy_error``, as a completion's decision would be: an empty
    list would tell the client it may use nothing, and the operator nothing
    (only a log line said so).
    """
    try:
        allowed = await state.components.policy.visible_models_known(principal.policy_view(),
                                                                     [s.policy_view() for s in specs])
    except PolicyUnavailable as exc:
        raise policy_unavailable(exc) from None
    if allowed is None:
        raise ApiError(403, POLICY_ERROR, "The policy could not say which models this key may use: its "
                       "evaluation failed (the gateway's log names the error). Nothing is listed until it is fixed.")
    return [spec for spec in specs if spec.name in allowed]


async def _queues(state: State, principal: Principal, specs: list[ModelSpec]) -> dict[str, dict[str, Any]]:
    """Each model's queue as ``principal`` may see it (every team's count for an admin, its own place for
    others); none when Redis cannot answer: the list still answers, with ``"queue": null``."""
    settings = state.components.settings
    try:
        return await queue_views(state.components.redis, [spec.name for spec in specs], team=principal.team,
                                 admin=ADMIN_ROLE in principal.roles, limit=settings.max_queued_per_model,
                                 mode=settings.queue_mode)
    except (RedisError, OSError) as exc:
        log.warning("GET /v1/models without queues: Redis did not answer: %s: %s", type(exc).__name__, exc)
        return {}


def _model_object(spec: ModelSpec, queue: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's model object, plus what govgate knows of the model and its queue."""
    return {
        "id": spec.name,
        "object": "model",
        "created": 0,
        "owned_by": "govgate",
        "family": spec.family,
        "context_length": spec.context_length,
        "tags": list(spec.tags),
        "queue": queue,
    }
