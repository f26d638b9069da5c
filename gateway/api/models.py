"""``GET /v1/models``: the models the caller may use, as the policy decides."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.di import NamedDependency

from gateway import urls
from gateway.api.openapi import MODELS_OPERATION, SECURITY
from gateway.auth import Principal
from redis.exceptions import RedisError


class ModelsController(Controller):
    tags = ["models"]

    @get(urls.MODELS, summary="List the models this key may use", operation_id="listModels",
         operation_class=MODELS_OPERATION, security=SECURITY)
    async def list_models(self, state: State, principal: NamedDependency[Principal]) -> dict[str, Any]:
        components = state.components
        specs = [components.registry.models[name] for name in components.registry.names()]
        allowed = await components.policy.visible_models(principal.policy_view(), [s.policy_view() for s in specs])
        visible = [spec for spec in specs if spec.name in allowed]
        limit = components.settings.max_queued_per_model
        waiting = {}
        for spec in visible:
            try:
                waiting[spec.name] = await components.completions.queue_depth(spec.name)
            except (RedisError, OSError):
                waiting[spec.name] = None
        return {
            "object": "list",
            "data": [
                {
                    "id": spec.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "govgate",
                    "family": spec.family,
                    "context_length": spec.context_length,
                    "tags": list(spec.tags),
                    "queue": {"waiting": waiting[spec.name], "limit": limit},
                }
                for spec in visible
            ],
        }
