"""Probe p2 #1 on a served gateway: a flood of requests the policy denies does not fill the queue.

One key, whose last request was allowed (so its next ones reserve early,
before the policy decides), keeps requests with blocked content going from
several threads (each refused 403); another team sends valid requests one
after another to the tiny model, with ``GOVGATE_MAX_QUEUED_PER_MODEL`` at 2.
Before 2026-12-05 the early reservations held queue places while their
decisions ran, and a third of such valid requests were refused 429
``queue_full`` (probe p2: limit 4, 12 flooding). Now none is: the valid
requests' own job is the only one the queue ever holds.
"""

from __future__ import annotations

import threading
import uuid

import httpx

from tests.conftest import bearer, serving
from tests.keys_and_limits import new_key
from workers.contract.registry import TINY_MODEL_NAME

FLOODERS = 8
VALID = 40
BLOCKED = "-----BEGIN PRIVATE KEY----- x"  # the shipped policy refuses it (blocked_content)


def _body(content: str) -> dict:
    return {"model": TINY_MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}


def test_requests_being_denied_take_no_place_from_another_teams_valid_ones(settings, worker, tmp_path) -> None:
    own = settings.with_(queue_mode="fifo", max_queued_per_model=2)
    tag = uuid.uuid4().hex[:6]
    heavy = new_key(own, f"flood-{tag}", f"fl-{tag}")
    light = new_key(own, f"steady-{tag}", f"st-{tag}")
    done = threading.Event()
    denied: list[int] = []

    with serving(own, tmp_path / "serve.log") as base:
        def post(key: str, content: str, client: httpx.Client) -> httpx.Response:
            return client.post(f"{base}/v1/chat/completions", headers=bearer(key), json=_body(content))

        def flood() -> None:
            with httpx.Client(timeout=60) as client:
                while not done.is_set():
                    denied.append(post(heavy, BLOCKED, client).status_code)

        with httpx.Client(timeout=60) as client:
            primed = post(heavy, "Hello", client)  # allowed: the flood's requests reserve early
            assert primed.status_code == 200, primed.text
            threads = [threading.Thread(target=flood) for _ in range(FLOODERS)]
            for thread in threads:
                thread.start()
            try:
                answers = []
                for _ in range(VALID):
                    answer = post(light, "Hello", client)
                    answers.append((answer.status_code, answer.text[:200]))
            finally:
                done.set()
                for thread in threads:
                    thread.join(60)
    assert set(denied) == {403} and len(denied) >= FLOODERS, sorted(set(denied))
    assert [a for a in answers if a[0] != 200] == []
