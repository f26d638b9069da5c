"""``GET /metrics``: this gateway process's Prometheus metrics (no key needed, like ``/healthz``).

Without an operator's credential every per-model series is summed over the
models, its ``model`` label dropped: the route names no model to a caller
``/v1/models`` would show none (``gateway/api/operator_view.py``).

Counters and histograms are this process's own (a Prometheus scrapes
every replica); queue depth and live workers per model are read from Redis
at scrape time (:mod:`gateway.observability.cluster`, bounded by a short
timeout), with ``govgate_cluster_read_ok`` saying whether that read worked.
"""

from __future__ import annotations

from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from prometheus_client import generate_latest

from gateway import urls
from gateway.api.openapi import MetricsOperation
from gateway.api.operator_view import shows_models
from gateway.observability.cluster import read_cluster
from gateway.observability.exposition import cluster_text, ModelsSummed
from gateway.observability.metrics import REGISTRY

#: The text format ``generate_latest`` writes (prometheus_client's CONTENT_TYPE_LATEST names 1.0.0; Litestar adds
#: the charset).
MEDIA_TYPE = "text/plain; version=0.0.4"


class MetricsController(Controller):
    tags = ["operations"]

    @get(urls.METRICS, summary="Prometheus metrics of this gateway process", operation_class=MetricsOperation,
         operation_id="metrics")
    async def metrics(self, request: Request, state: State) -> Response:
        per_model = await shows_models(request, state)
        components = state.components
        cluster = await read_cluster(components.redis, components.registry.names())
        process = generate_latest(REGISTRY if per_model else ModelsSummed(REGISTRY))
        return Response(process + cluster_text(cluster, per_model=per_model), media_type=MEDIA_TYPE)
