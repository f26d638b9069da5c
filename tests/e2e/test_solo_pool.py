"""Workers on Celery's solo pool (``GOVGATE_WORKER_POOL=solo``): the job in the worker's own process.

The same promises as prefork's, kept by other means: the time limits by the
worker itself (workers/job_limits.py), a dead worker's job handed to the next
worker (tests/e2e/test_crash_safety.py runs its time-limit and whole-worker
tests on both pools). Real workers, a served gateway, the audit log.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import redis

from govgate.processes import stop_process
from tests.conftest import SOLO_MODEL, bearer, spawn_cli, wait_for_worker
from workers.contract.jobs import loaded_key


def children_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def solo_worker(settings):
    process = spawn_cli(settings.with_(worker_pool="solo"), "worker", "--model", SOLO_MODEL,
                        log=settings.var_dir / "solo-worker.log")
    wait_for_worker(settings.redis_url, SOLO_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


def complete(base: str, key: str, model: str, **fields) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={"model": model, "prompt": "Tell", "temperature": 0, **fields})


def test_a_solo_worker_runs_jobs_in_its_own_process(settings, served_api, solo_worker, keyring, audit_store):
    assert children_of(solo_worker.pid) == []  # no pool process: the store's child is gone once it is ready
    client = redis.Redis.from_url(settings.redis_url)
    try:  # it said the model is loaded under its own pid (govgate up waits for this key)
        assert client.get(loaded_key(SOLO_MODEL, solo_worker.pid)) == str(solo_worker.pid).encode()
    finally:
        client.close()
    response = complete(served_api, keyring["admin"], SOLO_MODEL, max_tokens=8)
    assert response.status_code == 200, (settings.var_dir / "solo-worker.log").read_text()[-5000:]
    assert response.json()["usage"]["completion_tokens"] == 8
    request_id = response.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]
    assert entries[1].body["worker"]["pid"] == solo_worker.pid


def test_a_solo_worker_streams(served_api, solo_worker, keyring, audit_store):
    with httpx.stream("POST", f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                      json={"model": SOLO_MODEL, "prompt": "Tell", "max_tokens": 12, "temperature": 0,
                            "stream": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-govgate-request-id"]
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "completion" and terminal.payload["output"] == text
