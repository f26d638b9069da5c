"""Queues under faults: killed worker processes, time limits. Every request ends exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from gateway.processes import stop_process
from tests.conftest import CRASH_MODEL, LIMITED_MODEL, bearer, spawn_cli, wait_for_worker


def pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.fixture(scope="module")
def crash_worker(settings):
    process = spawn_cli(settings, "worker", "--model", CRASH_MODEL, log=settings.var_dir / "crash-worker.log")
    wait_for_worker(settings.redis_url, CRASH_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


@pytest.fixture(scope="module")
def limited_worker(settings):
    limited = settings.with_(generation_time_limit_s=0.3)
    process = spawn_cli(limited, "worker", "--model", LIMITED_MODEL, log=settings.var_dir / "limited-worker.log")
    wait_for_worker(settings.redis_url, LIMITED_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


def kill_pool_process_once_generating(settings, worker, found: dict) -> None:
    """Wait until a generation has begun in the worker's pool process, then SIGKILL that process."""
    client = redis.Redis.from_url(settings.redis_url)
    before = set(client.keys("govgate:started:*"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        started = set(client.keys("govgate:started:*")) - before
        if started:
            time.sleep(0.2)  # well inside a ~1 s generation
            victim = pool_children(worker.pid)[0]
            os.kill(victim, signal.SIGKILL)
            found["victim"] = victim
            found["request_id"] = started.pop().decode().rsplit(":", 1)[1]
            return
        time.sleep(0.01)


def test_killed_pool_process_is_redelivered_and_the_request_ends_once(settings, served_api, crash_worker,
                                                                     keyring, audit_store):
    found: dict = {}
    killer = threading.Thread(target=kill_pool_process_once_generating, args=(settings, crash_worker, found))
    killer.start()
    response = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                          json={"model": CRASH_MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0})
    killer.join()
    assert found.get("victim"), "the generation was never seen starting"
    assert response.status_code == 200, response.text
    request_id = response.headers["x-govgate-request-id"]
    assert request_id == found["request_id"]
    assert response.json()["usage"]["completion_tokens"] == 4000
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]  # redelivered, generated once more, ended once
    assert entries[1].body["worker"]["pid"] != found["victim"]
    assert crash_worker.poll() is None  # the worker itself survived and replaced its pool process


def test_a_stream_whose_worker_dies_ends_with_an_error_not_a_repeat(settings, served_api, crash_worker,
                                                                   keyring, audit_store):
    found: dict = {}
    killer = threading.Thread(target=kill_pool_process_once_generating, args=(settings, crash_worker, found))
    killer.start()
    events = []
    with httpx.stream("POST", f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                      json={"model": CRASH_MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0,
                            "stream": True}) as response:
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    killer.join()
    assert found.get("request_id") == request_id
    assert "error" in events[-1] and events[-1]["error"]["code"] == "worker_lost"
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "failed" and terminal.body["error"]["code"] == "worker_lost"
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "failed"]


def test_generation_time_limit_gives_504_and_a_timed_out_entry(served_api, limited_worker, keyring, audit_store):
    response = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                          json={"model": LIMITED_MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    entry = audit_store.tail(1)[0]
    assert entry.kind == "timed_out" and entry.model == LIMITED_MODEL
    assert 0 < entry.body["usage"]["completion_tokens"] < 4000  # stopped part-way, partial output kept
    assert entry.body["output"]
