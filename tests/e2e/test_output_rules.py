"""Output rules on the request path, end to end: served gateways, real workers, the tiny model, regorus.

The test policy is the shipped folder plus a module whose output rules
match words the tiny model really says: the test first asks the model (its
greedy output is deterministic) and then writes the rules around what it said.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from govgate.processes import stop_process
from tests.conftest import ORPHAN_MODEL, OUTPUT_MODEL, bearer, serving, spawn_cli, wait_for_worker


def stream_events(base: str, key: str, body: dict) -> tuple[str, list[dict]]:
    """The request id and every SSE event of a streamed request, read raw."""
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    return request_id, events


def queued(client: redis.Redis, model: str) -> int:
    """Jobs waiting in ``model``'s queue, every priority."""
    return sum(client.llen(f"model.{model}{suffix}") for suffix in ["", *(f":{n}" for n in range(1, 10))])


def test_a_gateway_killed_before_the_verdict_leaves_the_output_recorded_unchecked(settings, keyring, audit_store,
                                                                                   tmp_path):
    """The job is queued, its gateway dies, then a worker runs it: nobody answers its report."""
    client = redis.Redis.from_url(settings.redis_url)
    with serving(settings, tmp_path / "serve.log") as base:
        with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                          json={"model": ORPHAN_MODEL, "prompt": "Once upon a time", "max_tokens": 16,
                                "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-govgate-request-id"]
            assert queued(client, ORPHAN_MODEL) == 1
            base.process.kill()  # the gateway dies with the job in the queue
            base.process.wait(timeout=30)
    worker = spawn_cli(settings.with_(output_verdict_timeout_s=1.0), "worker", "--model", ORPHAN_MODEL,
                       log=tmp_path / "worker.log")
    try:
        wait_for_worker(settings.redis_url, ORPHAN_MODEL, worker)
        deadline = time.monotonic() + 60
        while audit_store.terminal_for(request_id) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(worker, timeout_s=30)
        client.close()
    terminal = audit_store.terminal_for(request_id)
    assert terminal is not None and terminal.kind == "failed"
    assert terminal.body["error"]["code"] == "output_unchecked"
    assert terminal.body["usage"]["completion_tokens"] == 16  # it was generated, and kept as logging allows
    assert "output_decision" not in terminal.body and "client_output" not in (terminal.payload or {})
