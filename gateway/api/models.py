"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use, as the policy decides.

A model the policy does not let this key use is answered exactly like one
that does not exist (404 ``model_not_found``), as the list leaves it out:
a key learns nothing about models it may not use, and OpenAI answers the
same way for models an account cannot access.
"""

from __future__ import annotations

import math
from typing import Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from redis.exceptions import RedisError

from gateway import urls
from gateway.api.openapi import MODEL_OPERATION, MODELS_OPERATION, SECURITY
from gateway.auth import Principal
from gateway.dispatch import queue_depth
from gateway.api_errors import ApiError
from gateway.policy import POLICY_UNAVAILABLE, PolicyUnavailable
from gateway.policy.engine import UNAVAILABLE_RETRY_AFTER_S
from workers.contract.registry import ModelSpec


class ModelsController(Controller):
    tags = ["models"]

    @get(urls.MODELS, summary="List the models this key may use", operation_id="listModels",
         operation_class=MODELS_OPERATION, security=SECURITY)
    async def list_models(self, state: State, principal: NamedDependency[Principal]) -> dict[str, Any]:
        components = state.components
        specs = [components.registry.models[name] for name in components.registry.names()]
        visible = await _visible(state, principal, specs)
        return {"object": "list", "data": [await _model_object(state, spec) for spec in visible]}

    @get(urls.MODEL, summary="One model this key may use", operation_id="retrieveModel",
         operation_class=MODEL_OPERATION, security=SECURITY)
    async def retrieve_model(self, state: State, principal: NamedDependency[Principal],
                             model_id: FromPath[str]) -> dict[str, Any]:
        spec = state.components.registry.get(model_id)
        if spec is None or not await _visible(state, principal, [spec]):
            raise ApiError(404, "model_not_found", f"The model '{model_id}' does not exist or this key may not "
                           "use it. GET /v1/models lists the models you may use.", param="model")
        return await _model_object(state, spec)


async def _visible(state: State, principal: Principal, specs: list[ModelSpec]) -> list[ModelSpec]:
    """``specs`` the policy lets ``principal`` use (none when the policy errs).

    A policy that cannot answer in time is a retryable 503, as for a
    completion: an empty list would tell the client it may use nothing.
    """
    try:
        allowed = await state.components.policy.visible_models(principal.policy_view(),
                                                               [s.policy_view() for s in specs])
    except PolicyUnavailable as exc:
        retry_after = math.ceil(UNAVAILABLE_RETRY_AFTER_S)
        raise ApiError(503, POLICY_UNAVAILABLE, f"No policy decision could be had in time ({exc}); try again in "
                       f"{retry_after} s.", headers={"Retry-After": str(retry_after)}) from None
    return [spec for spec in specs if spec.name in allowed]


async def _model_object(state: State, spec: ModelSpec) -> dict[str, Any]:
    """OpenAI's model object, plus what govgate knows of the model and its queue."""
    components = state.components
    try:
        waiting = await queue_depth(components.redis, spec.name)
    except (RedisError, OSError):
        waiting = None
    return {
        "id": spec.name,
        "object": "model",
        "created": 0,
        "owned_by": "govgate",
        "family": spec.family,
        "context_length": spec.context_length,
        "tags": list(spec.tags),
        "queue": {"waiting": waiting, "limit": components.settings.max_queued_per_model},
    }
