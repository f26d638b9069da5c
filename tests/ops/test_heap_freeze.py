"""A served gateway and a worker freeze their startup heap once up, so a full collection stalls nobody.

Each full garbage collection walked the ~140,000 objects a process made to
start, a 50–70 ms stall every few seconds of load (measured during
``bench/fairness.py``); frozen, it walks only what was made since.
Real processes: ``govgate serve`` (its ``/metrics`` reports what is frozen)
and ``govgate worker`` on both pools (its log says so, per process).
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from gateway import urls
from govgate.processes import stop_process
from tests.conftest import serving, spawn_cli, wait_for_worker
from tests.ops.metrics_text import samples, value
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.registry import TINY_MODEL_NAME

#: Far fewer than either process makes to start, far more than a process that never froze holds.
AT_LEAST = 20_000
FROZEN_LINE = re.compile(r"startup heap frozen: (\d+) objects")


def test_a_served_gateway_has_its_startup_heap_frozen(settings, tmp_path) -> None:
    with serving(settings, tmp_path / "serve.log") as base:
        scraped = samples(httpx.get(f"{base}{urls.METRICS}", timeout=10).text)
    assert value(scraped, "govgate_gc_frozen_objects") >= AT_LEAST
    assert ("python_gc_collections_total", frozenset({("generation", "2")})) in scraped
    assert [int(n) >= AT_LEAST for n in FROZEN_LINE.findall((tmp_path / "serve.log").read_text())] == [True]


@pytest.mark.anyio
async def test_an_app_made_in_a_test_freezes_nothing(client) -> None:
    """``create_app`` freezes only for the served process: a test process makes many apps."""
    response = await client.get(urls.METRICS)
    assert response.status_code == 200
    assert value(samples(response.text), "govgate_gc_frozen_objects") == 0


@pytest.mark.parametrize("pool, processes", [("solo", 1), ("prefork", 2)])
def test_a_worker_freezes_its_startup_heap_in_every_process(own_redis, tmp_path, pool, processes) -> None:
    """Solo: the worker's one process once it consumes; prefork: the main process and its pool process."""
    log = tmp_path / "worker.log"
    worker = spawn_cli(own_redis.with_(worker_pool=pool), "worker", "--model", TINY_MODEL_NAME, log=log)
    try:
        wait_for_worker(own_redis.redis_url, TINY_MODEL_NAME, worker)
        deadline = time.monotonic() + 30
        while len(FROZEN_LINE.findall(log.read_text())) < processes and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(worker, timeout_s=30)
    counts = [int(n) for n in FROZEN_LINE.findall(log.read_text())]
    assert len(counts) == processes, log.read_text()[-3000:]
    assert all(n >= AT_LEAST for n in counts), counts
