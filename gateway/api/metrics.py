"""``GET /metrics``: this gateway process's Prometheus metrics (no key needed, like ``/healthz``).

Counters and histograms are this process's own (a Prometheus scrapes
every replica); queue depth and live workers per model are read from Redis
at scrape time (:mod:`gateway.observability.cluster`, bounded by a short
timeout), with ``govgate_cluster_read_ok`` saying whether that read worked.
"""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State
from prometheus_client import generate_latest

from gateway import urls
from gateway.api.openapi import MetricsOperation
from gateway.observability.cluster import read_cluster
from gateway.observability.exposition import cluster_text
from gateway.observability.metrics import REGISTRY

#: The text format ``generate_latest`` writes (prometheus_client's CONTENT_TYPE_LATEST names 1.0.0; Litestar adds
#: the charset).
MEDIA_TYPE = "text/plain; version=0.0.4"


class MetricsController(Controller):
    tags = ["operations"]

    @get(urls.METRICS, summary="Prometheus metrics of this gateway process", operation_class=MetricsOperation,
         operation_id="metrics")
    async def metrics(self, state: State) -> Response:
        components = state.components
        cluster = await read_cluster(components.redis, components.registry.names())
        return Response(generate_latest(REGISTRY) + cluster_text(cluster), media_type=MEDIA_TYPE)
