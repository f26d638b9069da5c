"""A prefork worker that runs several jobs at once counts as that many in the queue's estimates.

The queue's estimated wait (``GET /v1/models``) and a ``queue_full``
refusal's ``Retry-After`` divide the jobs ahead by the rate the model's
workers end them: the mean service time of one job (measured per job) ÷ the
jobs they run at once. Each worker beat one member of the live-workers set,
so a worker of ``--concurrency 2`` counted as one and every estimate was
twice too long. A served gateway and a real prefork worker, on a Redis of
the test's own; the mean service time is set, not measured, so the figures
are exact.
"""

from __future__ import annotations

import time

import httpx
import redis

from govgate.processes import stop_process
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.keys_and_limits import new_key
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.fair_queues import tags_key
from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY, live_counts, live_slots
from workers.contract.registry import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME


def _live(raw: redis.Redis) -> list[bytes]:
    return raw.eval(LIVE_SCRIPT, 1, WORKERS_KEY)


def test_a_worker_of_two_pool_processes_halves_the_estimated_wait(own_redis, tmp_path) -> None:  # noqa: F811
    own = own_redis.with_(queue_mode="fair", worker_pool="prefork")
    key = new_key(own, "slots-user", "slots-team")
    raw = redis.Redis.from_url(own.redis_url)
    worker = spawn_cli(own, "worker", "--model", MODEL, "--concurrency", "2", log=tmp_path / "worker.log")
    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, MODEL, worker)
            deadline = time.monotonic() + 30
            while live_counts(_live(raw)).get(MODEL) != 1:  # the heartbeat begins once the worker consumes
                assert time.monotonic() < deadline, "the worker's heartbeat never came"
                time.sleep(0.05)
            live = _live(raw)
            raw.hset(tags_key(MODEL), "svc", "1000")  # one job takes 1 s (no job runs here to change it)
            view = httpx.get(f"{base}/v1/models/{MODEL}", headers=bearer(key), timeout=30).json()["queue"]
    finally:
        stop_process(worker, timeout_s=30)
    after = _live(raw)
    raw.close()
    assert live_counts(live) == {MODEL: 1} and live_slots(live) == {MODEL: 2}  # one worker, two jobs at once
    # nothing waits: a request sent now is next, done in 1 s ÷ 2 jobs at once
    assert view == {"waiting": 0, "limit": own.max_queued_per_model, "your_team_waiting": 0, "position": 1,
                    "estimated_wait_s": 0.5}
    assert MODEL not in live_slots(after)  # a worker stopped cleanly takes all its members with it
