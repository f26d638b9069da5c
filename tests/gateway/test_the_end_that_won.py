"""When the gateway ends a request (its timeout, a worker's failure outcome) and another end won: that end answers.

A served gateway with a short request timeout, a model no worker serves (so
nothing ends the request but what the test writes), and the competing end
written through the store (or kept in the pending terminals, as a worker's
hand-over fallback is) while the gateway still waits: the gateway's own
entry (``timed_out`` at its timeout, ``failed`` on a task's failure
outcome) meets the unique terminal constraint (or the pending entry is
written first), and the request must be answered and settled as the
winning entry says. Each test has a principal of its own, so its usage
counters show what was charged.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from tests.conftest import IDLE_MODEL, bearer, serving
from tests.keys_and_limits import new_key
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.sealing import Sealer, load_or_create_key
from workers.replies import deliver, failure

pytestmark = pytest.mark.anyio

#: Counted from the queueing, right after the request entry: long enough for the test to find that
#: entry and write the competing end well before the timeout fires, even on a busy machine (measured
#: with a CPU burner and another suite running: at most 30 ms from the entry to the written end; but
#: session 45's test-busy run once saw 2 s pass first). Six of the tests wait it out, so it is kept short.
TIMEOUT_S = 3.0
TEAM = "tw-team"


@pytest.fixture(scope="module")
def gateway(settings, tmp_path_factory) -> Iterator[str]:
    with serving(settings.with_(request_timeout_s=TIMEOUT_S), tmp_path_factory.mktemp("tw") / "serve.log") as base:
        yield base


@dataclass
class Asked:
    """A request in flight: its principal, its id once recorded, then its response."""

    principal: str
    request_id: str = ""
    response: httpx.Response | None = None


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def race(gateway: str, settings, audit_store, end) -> Asked:
    """Ask as a fresh principal; once the request is recorded, call ``end(asked)``; the response."""
    asked = Asked(f"tw-{uuid.uuid4().hex[:10]}")
    key = new_key(settings, asked.principal, TEAM, roles=("admin",))
    start = audit_store.head().seq

    def ask() -> None:
        asked.response = httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=60,
                                    json={"model": IDLE_MODEL, "prompt": "Once upon a time", "max_tokens": 8})

    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, ask)
        deadline = time.monotonic() + 60
        while not asked.request_id:
            assert time.monotonic() < deadline, "the request was never recorded"
            await anyio.sleep(0.02)
            asked.request_id = next((e.request_id for e in audit_store.iter_entries(start)
                                     if e.kind == "request" and e.principal == asked.principal), "")
        [entry] = audit_store.entries_for(asked.request_id)  # admitted, and the gateway still waits
        assert entry.body["decision"]["allow"] is True
        end(asked)
    assert asked.response is not None
    return asked


def write_end(audit_store, kind: str, body: dict[str, Any], payload: dict[str, Any] | None = None):
    def end(asked: Asked) -> None:
        audit_store.append(kind, asked.request_id, principal=asked.principal, team=TEAM, model=IDLE_MODEL,
                           body=body, policy_revision="rev", payload=payload)
    return end


async def charged(settings, principal: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        document = await UsageCounters(client).snapshot(principal, TEAM)
    finally:
        await client.aclose()
    return {"tokens_today": document["principal"]["tokens_today"], "in_flight": document["principal"]["in_flight"]}


def terminal_kinds(audit_store, request_id: str) -> list[str]:
    return [e.kind for e in audit_store.entries_for(request_id) if e.kind != "request"]


async def test_a_worker_failure_that_won_is_the_answer_and_is_charged(gateway, settings, audit_store):
    body = {"error": {"code": "generation_failed", "message": "the backend refused"}, "usage": usage(3, 5)}
    asked = await race(gateway, settings, audit_store, write_end(audit_store, "failed", body))
    assert asked.response.status_code == 502, asked.response.text
    assert asked.response.json()["error"]["code"] == "generation_failed"
    assert terminal_kinds(audit_store, asked.request_id) == ["failed"]
    assert await charged(settings, asked.principal) == {"tokens_today": 8, "in_flight": 0}


async def test_a_written_hand_over_fallback_that_won_is_a_503_output_unchecked(gateway, settings, audit_store):
    body = {"error": {"code": "output_unchecked", "message": "no output verdict came"}, "usage": usage(4, 7),
            "finish_reason": "length"}
    asked = await race(gateway, settings, audit_store, write_end(audit_store, "failed", body,
                                                                 {"output": "never served"}))
    assert asked.response.status_code == 503, asked.response.text
    assert asked.response.json()["error"]["code"] == "output_unchecked"
    assert asked.response.headers["retry-after"] == "1"
    assert "never served" not in asked.response.text
    assert terminal_kinds(audit_store, asked.request_id) == ["failed"]
    assert await charged(settings, asked.principal) == {"tokens_today": 11, "in_flight": 0}


async def test_a_kept_fallback_is_written_at_the_timeout_and_answers(gateway, settings, audit_store):
    """The hand-over's fallback as the worker keeps it (sealed, its not_before ahead): the timeout writes it."""
    sealer = Sealer(load_or_create_key(settings.effective_payload_key_file))
    client = redis.Redis.from_url(settings.redis_url)
    pending = PendingTerminals(client, horizon_s=600, seal=sealer.seal, unseal=sealer.unseal)

    def keep(asked: Asked) -> None:
        body = {"error": {"code": "output_unchecked", "message": "no output verdict came"}, "usage": usage(2, 6),
                "output": "kept, never served", "finish_reason": "length"}
        assert pending.keep(PendingTerminal(kind="failed", request_id=asked.request_id, principal=asked.principal,
                                            team=TEAM, model=IDLE_MODEL, body=body, policy_revision="rev",
                                            not_before=time.time() + 600))

    try:
        asked = await race(gateway, settings, audit_store, keep)
        assert not client.hexists(PENDING_KEY, asked.request_id)  # written, then dropped
    finally:
        client.close()
    assert asked.response.status_code == 503, asked.response.text
    assert asked.response.json()["error"]["code"] == "output_unchecked"
    [terminal] = [e for e in audit_store.entries_for(asked.request_id) if e.kind != "request"]
    assert terminal.kind == "failed" and "recorded_late" in terminal.body
    assert terminal.payload["output"] == "kept, never served"
    assert await charged(settings, asked.principal) == {"tokens_today": 8, "in_flight": 0}


async def test_a_cancel_that_won_keeps_the_504_and_charges_what_it_generated(gateway, settings, audit_store):
    body = {"error": {"code": "cancelled", "message": "generation was cancelled"}, "usage": usage(3, 2)}
    asked = await race(gateway, settings, audit_store, write_end(audit_store, "cancelled", body, {"output": "Hi"}))
    assert asked.response.status_code == 504, asked.response.text
    assert asked.response.json()["error"]["code"] == "timed_out"
    assert terminal_kinds(audit_store, asked.request_id) == ["cancelled"]
    assert await charged(settings, asked.principal) == {"tokens_today": 5, "in_flight": 0}


async def test_a_completion_that_won_is_served_and_charged(gateway, settings, audit_store):
    body = {"finish_reason": "length", "usage": usage(3, 4)}
    asked = await race(gateway, settings, audit_store, write_end(audit_store, "completion", body,
                                                                 {"output": "a late answer"}))
    assert asked.response.status_code == 200, asked.response.text
    assert asked.response.json()["choices"][0]["text"] == "a late answer"
    assert terminal_kinds(audit_store, asked.request_id) == ["completion"]
    assert await charged(settings, asked.principal) == {"tokens_today": 7, "in_flight": 0}


async def test_the_gateways_own_timeout_charges_nothing(gateway, settings, audit_store):
    asked = await race(gateway, settings, audit_store, lambda asked: None)
    assert asked.response.status_code == 504, asked.response.text
    assert asked.response.json()["error"]["code"] == "timed_out"
    assert terminal_kinds(audit_store, asked.request_id) == ["timed_out"]
    assert await charged(settings, asked.principal) == {"tokens_today": 0, "in_flight": 0}


def fail_task(settings, then=None):
    """Publish a task failure for the request to every gateway (as a worker whose task raised), after ``then``."""
    def end(asked: Asked) -> None:
        if then is not None:
            then(asked)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            channels = client.pubsub_channels("govgate:gateway:*")
            assert channels
            for channel in channels:  # the others wait for no such request
                assert deliver(client, asked.request_id, channel.decode(), failure(RuntimeError("task raised")))
        finally:
            client.close()
    return end


async def test_a_task_failure_after_the_worker_recorded_a_completion_serves_the_completion(gateway, settings,
                                                                                           audit_store):
    body = {"finish_reason": "length", "usage": usage(3, 4)}
    asked = await race(gateway, settings, audit_store, fail_task(settings, write_end(
        audit_store, "completion", body, {"output": "recorded before the task raised"})))
    assert asked.response.status_code == 200, asked.response.text
    assert asked.response.json()["choices"][0]["text"] == "recorded before the task raised"
    assert terminal_kinds(audit_store, asked.request_id) == ["completion"]
    assert await charged(settings, asked.principal) == {"tokens_today": 7, "in_flight": 0}


async def test_a_task_failure_alone_is_a_502_worker_error_that_charges_nothing(gateway, settings, audit_store):
    asked = await race(gateway, settings, audit_store, fail_task(settings))
    assert asked.response.status_code == 502, asked.response.text
    assert asked.response.json()["error"]["code"] == "worker_error"
    [terminal] = [e for e in audit_store.entries_for(asked.request_id) if e.kind != "request"]
    assert terminal.kind == "failed" and terminal.body["error"] == {"code": "worker_error",
                                                             "message": "RuntimeError: task raised"}
    assert await charged(settings, asked.principal) == {"tokens_today": 0, "in_flight": 0}
