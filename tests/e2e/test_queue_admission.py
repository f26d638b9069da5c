"""Admission control on a served gateway: beyond a model's queue limit, requests are refused, not queued.

Requests must really wait at once, so this runs ``govgate serve`` rather than
the in-process client.
"""

from __future__ import annotations

import time

from tests.conftest import bearer
from tests.gateway.test_fail_closed import queued

HELLO = [{"role": "user", "content": "Hello"}]


def test_full_queue_answers_429_with_retry_after(settings, keyring, audit_store, tmp_path):
    """Admission control: beyond the per-model limit the gateway refuses instead of queueing."""
    import threading

    import httpx

    from tests.conftest import QUEUE_MODEL, serving

    # fifo: the total cap over the model's one queue (fair mode's per-team caps are tested with them)
    # The two queued requests must still wait when the third is refused (a fraction of a second later); the
    # test then waits their timeout out.
    own = settings.with_(max_queued_per_model=2, request_timeout_s=3, queue_mode="fifo")
    statuses: list[int] = []
    with serving(own, tmp_path / "serve.log") as base:
        def wait_in_queue() -> None:
            statuses.append(httpx.post(f"{base}/v1/chat/completions", headers=bearer(keyring["admin"]),
                                       json={"model": QUEUE_MODEL, "messages": HELLO}, timeout=60).status_code)

        waiting = [threading.Thread(target=wait_in_queue) for _ in range(2)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while queued(own, QUEUE_MODEL) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listing = httpx.get(f"{base}/v1/models", headers=bearer(keyring["admin"])).json()
        refused = httpx.post(f"{base}/v1/chat/completions", headers=bearer(keyring["admin"]),
                             json={"model": QUEUE_MODEL, "messages": HELLO}, timeout=60)
        for thread in waiting:
            thread.join(30)
    queue = {m["id"]: m["queue"] for m in listing["data"]}[QUEUE_MODEL]
    assert queue == {"waiting": 2, "limit": 2}
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    assert [r["code"] for r in error["reasons"]] == ["queue_full"]
    refused_entry = [e for e in audit_store.tail(6) if (e.body.get("admission") or {}).get("code") == "queue_full"]
    assert refused_entry and audit_store.terminal_for(refused_entry[-1].request_id) is None
    assert sorted(statuses) == [504, 504]  # the two queued requests were still waiting, then timed out
