"""A graceful stop ends a request still in admission at the drain's cut with OpenAI's 503 ``shutting_down``,
recorded ``rejected`` (probe q1 F3).

Real parts: ``govgate serve`` (uvicorn) with a short drain, a policy that takes minutes on a prompt that says
"slow", the suite's Redis and database.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import bearer, serving
from tests.e2e.test_drain import MODEL, _until_stopping
from tests.own_redis import own_redis  # noqa: F401  (fixture)


def test_a_graceful_stop_answers_a_request_waiting_for_its_policy_decision_at_the_cut(
        own_redis, keyring, audit_store, tmp_path) -> None:  # noqa: F811
    """Not a second signal: the drain's own cut ends the wait for the decision.

    Before (probe q1 F3), a decision slower than the drain and uvicorn's graceful bound was left to that
    bound: uvicorn cancelled the request's task, its client got a plain-text 500, the log a
    ``CancelledError`` traceback, and the audit nothing at all for a request authenticated and read.
    """
    from tests.e2e.test_policy_pool_api import slow_on_request_policy

    own = own_redis.with_(drain_s=1.0, policy_dir=slow_on_request_policy(tmp_path / "policy"),
                          policy_timeout_s=120.0, policy_wait_timeout_s=120.0, output_rules=False)
    log = tmp_path / "serve.log"
    with serving(own, log) as base, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{base}/v1/completions", headers=bearer(keyring["admin"]), timeout=90,
                              json={"model": MODEL, "prompt": "slow please", "max_tokens": 5})
        time.sleep(1.0)  # lets the request reach its decision (one still being read is refused as well)
        base.process.send_signal(signal.SIGTERM)
        _until_stopping(base)
        answered = waiting.result(timeout=90)
        assert base.process.wait(timeout=60) is not None
    assert answered.status_code == 503, answered.text
    assert answered.headers["content-type"].startswith("application/json")
    assert answered.json()["error"]["code"] == "shutting_down"
    assert answered.headers["retry-after"]
    request_id = answered.headers["x-govgate-request-id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["rejected"], [e.kind for e in entries]
    assert entries[0].body["error"]["code"] == "shutting_down"
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
