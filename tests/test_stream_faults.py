"""Streams under faults: what the client saw is what the audit holds, and nothing is left behind.

Each test runs a served gateway (real uvicorn, real worker, real Redis) and
breaks something a stream depends on: the client leaves, Redis restarts, the
pool process generating the stream dies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.conftest import bearer, serving
from workers.registry import TINY_MODEL_NAME


def stream_once(base: str, key: str, body: dict, *, stop_after: int | None = None) -> dict:
    """Send one streaming request; return its id, the text received, the last event and whether it saw [DONE].

    ``stop_after`` abandons the stream (closes the connection) after that many text chunks.
    """
    text, last, done, chunks = "", None, False, 0
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            last = json.loads(line[6:])
            if "choices" in last and last["choices"]:
                piece = last["choices"][0].get("text") or ""
                text += piece
                chunks += bool(piece)
                if stop_after is not None and chunks >= stop_after:
                    break
    return {"request_id": request_id, "text": text, "last": last, "done": done}


def wait_terminal(audit_store, request_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = audit_store.terminal_for(request_id)
        if entry is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} never got its terminal entry")


def test_abandoned_streams_leave_no_pending_task_behind(settings, worker, keyring, audit_store, tmp_path):
    log = tmp_path / "serve.log"
    with serving(settings, log) as base:
        ids = []
        for _ in range(12):
            ids.append(stream_once(base, keyring["admin"], {"model": TINY_MODEL_NAME, "prompt": "Tell",
                                                            "max_tokens": 2000, "temperature": 0},
                                   stop_after=2)["request_id"])
        for request_id in ids:
            wait_terminal(audit_store, request_id)
        for _ in range(20):  # ordinary traffic afterwards: garbage gets collected meanwhile
            response = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                                  json={"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 2})
            assert response.status_code == 200, response.text
    assert [audit_store.terminal_for(i).kind for i in ids] == ["cancelled"] * len(ids)
    text = Path(log).read_text()
    assert "Task was destroyed but it is pending" not in text
