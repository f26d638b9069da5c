"""The gateway process's Prometheus metrics, and the one-line hooks the request path calls.

Each gateway process counts what it served itself; a Prometheus scrapes
every replica and adds them up (``sum by (model) (…)``). What belongs to
the whole deployment (queue depth, live workers) is not counted here but
read from Redis when ``/metrics`` is scraped (:mod:`gateway.observability.cluster`).

Cost on the request path is what matters (issue 9): a labelled child is
looked up once and cached, so a hook is a dict lookup and a locked add.
Labels take only bounded values: route templates (never a raw path), model
names the registry knows, error codes the gateway defines.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Awaitable, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector

T = TypeVar("T")

#: This process's metrics (not prometheus_client's global registry, so nothing else registers into it).
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY, namespace="")  # process_cpu_seconds_total, process_resident_memory_bytes, …
GCCollector(registry=REGISTRY)  # python_gc_collections_total{generation}, python_gc_objects_collected_total, …
#: What gateway.app.freeze_startup_heap took out of the collector's reach: 0 means every full collection
#: walks the whole startup heap again (a stall of tens of ms under load).
GC_FROZEN = Gauge("govgate_gc_frozen_objects", "Objects frozen at startup, out of the garbage collector's reach.",
                  registry=REGISTRY)
GC_FROZEN.set_function(gc.get_freeze_count)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter(
    "govgate_requests", "HTTP requests answered, by route, model, status class and error code.",
    ["endpoint", "model", "status", "code"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "govgate_request_duration_seconds", "Time from a request's arrival to its response's last byte.",
    ["endpoint"], buckets=_SLOW, registry=REGISTRY)
POLICY_SECONDS = Histogram(
    "govgate_policy_decision_seconds", "Time one policy decision took (waiting for an evaluator included).",
    buckets=_FAST, registry=REGISTRY)
POLICY_VM_MISMATCHES = Counter(
    "govgate_policy_vm_mismatches", "Policy answers on which an evaluator's compiled VM and its interpreter "
    "disagreed (the interpreter's was used; that evaluator stopped using the VM).", registry=REGISTRY)
POLICY_RELOADS = Counter(
    "govgate_policy_reloads", "Policy revisions this gateway tried to load after its start, by result: loaded, "
    "or rejected (did not compile or failed its trial; the running revision kept serving).", ["result"],
    registry=REGISTRY)
AUDIT_APPEND_SECONDS = Histogram(
    "govgate_audit_append_seconds", "Time one audit append by this gateway took (in its worker thread).",
    ["kind"], buckets=_FAST, registry=REGISTRY)
QUEUE_WAIT_SECONDS = Histogram(
    "govgate_queue_wait_seconds", "Time a request waited in its model's queue before a worker began it.",
    ["model"], buckets=_SLOW, registry=REGISTRY)
QUEUE_WITHDRAWN_WAIT_SECONDS = Histogram(
    "govgate_queue_withdrawn_wait_seconds", "Time a job had waited in its model's queue when this gateway took it "
    "back unstarted (its request timed out, its client left, the gateway stopped): the waits the worker-measured "
    "govgate_queue_wait_seconds never sees.", ["model"], buckets=_SLOW, registry=REGISTRY)
STALE_RESERVATIONS = Counter(
    "govgate_stale_reservations", "Reservations this gateway ended because their request never would, by kind: "
    "unrecorded (undone: its gateway died between reserving and recording it) or unsettled (settled to its end: "
    "its settle was lost with its gateway or with Redis) (gateway/requests/stale_reservations.py).", ["kind"],
    registry=REGISTRY)
TOKENS = Counter(
    "govgate_tokens", "Tokens of the requests this gateway served, by model and kind (prompt, completion).",
    ["model", "kind"], registry=REGISTRY)

#: Status classes by the status code's first digit.
_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_children: dict[tuple[str, str, str, str], object] = {}
_durations: dict[str, object] = {}
_cached: dict[tuple[Any, tuple[str, ...]], Any] = {}


def count_request(endpoint: str, model: str, status: int, code: str, seconds: float) -> None:
    """One answered request (called once per request by the request middleware)."""
    key = (endpoint, model, _CLASSES.get(status // 100, "other"), code)
    child = _children.get(key)
    if child is None:
        child = _children[key] = REQUESTS.labels(*key)
    child.inc()  # type: ignore[attr-defined]
    duration = _durations.get(endpoint)
    if duration is None:
        duration = _durations[endpoint] = REQUEST_SECONDS.labels(endpoint)
    duration.observe(seconds)  # type: ignore[attr-defined]


async def timed_decision(decision: Awaitable[T]) -> T:
    """Await a policy decision and record how long it took (errors and timeouts too)."""
    started = time.perf_counter()
    try:
        return await decision
    finally:
        POLICY_SECONDS.observe(time.perf_counter() - started)


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once (``labels()`` takes a lock and checks every value)."""
    key = (metric, labels)
    child = _cached.get(key)
    if child is None:
        child = _cached[key] = metric.labels(*labels)
    return child


def observe_append(kind: str, seconds: float) -> None:
    """One audit append of ``kind`` took ``seconds`` (its batch's time: ``gateway/requests/append_queue.py``)."""
    _child(AUDIT_APPEND_SECONDS, kind).observe(seconds)


def observe_withdrawn(model: str, enqueued_at_ns: int) -> None:
    """A job of ``model`` queued at ``enqueued_at_ns`` (wall clock) was taken back before any worker began it.

    ``govgate_queue_wait_seconds`` is filled from workers' results, so the
    requests that waited longest (timed out in the queue, or left by their
    client) were never observed, and the histogram looked best exactly when
    queues were worst (probe h8). They are observed here, apart: their wait
    is a lower bound (it was cut), not a wait that ended in a start."""
    if enqueued_at_ns > 0:
        _child(QUEUE_WITHDRAWN_WAIT_SECONDS, model).observe(max(0.0, (time.time_ns() - enqueued_at_ns) / 1e9))


def observe_result(model: str, prompt_tokens: int, completion_tokens: int, queue_ms: float | None) -> None:
    """A worker's result arrived: count its tokens and how long it queued."""
    if prompt_tokens:
        _child(TOKENS, model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        _child(TOKENS, model, "completion").inc(completion_tokens)
    if queue_ms is not None and queue_ms >= 0:
        _child(QUEUE_WAIT_SECONDS, model).observe(queue_ms / 1000)
