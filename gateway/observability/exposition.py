"""The deployment-wide gauges of one scrape, written in Prometheus's text format; and any registry with
its series summed over the models, for a scrape without the operator's credential.

The gauges are built per scrape from what
:func:`gateway.observability.cluster.read_cluster` read, in a registry of
their own: a gauge kept in the process registry would go on showing a
model's last value after Redis stopped answering.

Summed over the models (``gateway/api/operator_view.py`` says why): series
that differ only in their ``model`` label become one without it. Counters,
gauges and histogram buckets, counts and sums add up (every model's
histogram has the same buckets); a ``_created`` sample keeps the earliest.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from gateway.observability.cluster import ClusterState


class _ClusterCollector(Collector):
    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def collect(self):
        ok = GaugeMetricFamily("govgate_cluster_read_ok", "1 if this scrape could read queues and workers from "
                               "Redis, else 0 (and the gauges below are absent).")
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
        failing = GaugeMetricFamily("govgate_workers_failing", "Live workers of the model that fail every job "
                                    "for a reason of their own (payload key, audit store), read from Redis.",
                                    labels=["model"])
        for model in self.state.workers:
            found = self.state.failing.get(model)
            failing.add_metric([model], found.workers if found else 0)
        yield failing


def cluster_text(state: ClusterState, *, per_model: bool = True) -> bytes:
    """``state`` as exposition text (appended to the process registry's); summed over the models unless
    ``per_model``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ClusterCollector(state))
    return generate_latest(registry if per_model else ModelsSummed(registry))


#: The label summed away.
MODEL_LABEL = "model"


class ModelsSummed:
    """``source`` (a registry) as ``generate_latest`` reads it, each family's series summed over ``model``."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if not any(MODEL_LABEL in sample.labels for sample in family.samples):
                yield family
                continue
            summed: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != MODEL_LABEL}
                key = (sample.name, tuple(sorted(labels.items())))
                earlier = summed.get(key)
                if earlier is None:
                    summed[key] = Sample(sample.name, labels, sample.value, sample.timestamp)
                elif sample.name.endswith("_created"):
                    summed[key] = earlier._replace(value=min(earlier.value, sample.value))
                else:
                    summed[key] = earlier._replace(value=earlier.value + sample.value)
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = list(summed.values())
            yield out
