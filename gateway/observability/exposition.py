"""The deployment-wide gauges of one scrape, written in Prometheus's text format.

Built per scrape from what :func:`gateway.observability.cluster.read_cluster`
read, in a registry of their own: a gauge kept in the process registry
would go on showing a model's last value after Redis stopped answering.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.observability.cluster import ClusterState


class _ClusterCollector(Collector):
    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def collect(self):
        ok = GaugeMetricFamily("govgate_cluster_read_ok", "1 if this scrape could read queues and workers from "
                               "Redis, else 0 (and the two gauges below are absent).")
        ok.add_metric([], 0 if self.state.error else 1)
        yield ok
        if self.state.error:
            return
        depth = GaugeMetricFamily("govgate_queue_depth", "Jobs waiting in the model's queue (all priorities), "
                                  "read from Redis: the same on every replica.", labels=["model"])
        for model, queued in self.state.queued.items():
            depth.add_metric([model], queued)
        yield depth
        workers = GaugeMetricFamily("govgate_workers", "Live workers of the model (their heartbeat is fresh), "
                                    "read from Redis: the same on every replica.", labels=["model"])
        for model, count in self.state.workers.items():
            workers.add_metric([model], count)
        yield workers


def cluster_text(state: ClusterState) -> bytes:
    """``state`` as exposition text (appended to the process registry's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ClusterCollector(state))
    return generate_latest(registry)
