"""A job whose gateway is gone is recorded, not generated (``workers.contract.gateway_liveness``).

Real parts: the suite's Redis (each test its own reply channels), a real tiny model
and SQLite store; the gateway's heartbeat is the gateway's own :class:`GatewayBeat`
(or the contract's script with a time already past, for a gateway killed whose
beats stopped). The served path (a gateway SIGKILLed with a job queued) is in
``tests/e2e/test_gateway_death.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import replace

import pytest
import redis
import redis.asyncio as aioredis

from gateway.dispatch.gateway_beat import GatewayBeat
from gateway.requests.refusals import worker_error
from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from workers.contract.gateway_liveness import (GATEWAY_BEAT_SCRIPT, GATEWAY_BEAT_TTL_S, GATEWAY_FORGET_AFTER_S,
                                               GATEWAY_GONE, GATEWAYS_KEY)
from workers.contract.jobs import ENDED_UNSEEN_AFTER_S, STATUS_COMPLETED, GenerateJob
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.generation import run_job
from workers.streams import RedisJobChannel

SEALER = Sealer(os.urandom(32))


@pytest.fixture
def client(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    yield connection
    connection.close()


def channel_name() -> str:
    return f"govgate:gateway:test-{uuid.uuid4().hex}"


def waited_job(reply_to: str, *, stream: bool = False, waited_s: float = ENDED_UNSEEN_AFTER_S + 5) -> GenerateJob:
    return GenerateJob(request_id=f"gg-{uuid.uuid4().hex}", model="tiny-test", endpoint="completions",
                       params=SamplingParams(max_tokens=6, temperature=0), principal="alice", team="research",
                       policy_revision="rev", prompt="Hello", stream=stream, reply_to=reply_to,
                       enqueued_at_ns=time.time_ns() - int(waited_s * 1e9))


def killed_gateway(client: redis.Redis) -> str:
    """A gateway that beat, then was killed: its time ran out (scored in the past, by Redis's clock)."""
    channel = channel_name()
    client.eval(GATEWAY_BEAT_SCRIPT, 1, GATEWAYS_KEY, channel, -1, GATEWAY_FORGET_AFTER_S)
    return channel


def live_gateway(client: redis.Redis) -> str:
    channel = channel_name()
    client.eval(GATEWAY_BEAT_SCRIPT, 1, GATEWAYS_KEY, channel, GATEWAY_BEAT_TTL_S, GATEWAY_FORGET_AFTER_S)
    return channel


def counting_generations(model, monkeypatch) -> list[str]:
    generated: list[str] = []
    real_stream = model.stream
    monkeypatch.setattr(model, "stream", lambda prompt, params: generated.append(prompt) or
                        real_stream(prompt, params))
    return generated


def run(job: GenerateJob, model, store, client):
    return run_job(job, model, store, RedisJobChannel(client, job.request_id, streaming=job.stream, sealer=SEALER,
                                                      reply_to=job.reply_to))


def test_a_waited_job_of_a_killed_gateway_is_recorded_cancelled_not_generated(store, model, client, monkeypatch):
    generated = counting_generations(model, monkeypatch)
    job = waited_job(killed_gateway(client))
    result = run(job, model, store, client)
    assert generated == []
    assert result.status == "cancelled" and result.error["code"] == GATEWAY_GONE and result.completion_tokens == 0
    [entry] = store.entries_for(job.request_id)
    assert entry.kind == "cancelled" and entry.body["error"]["code"] == GATEWAY_GONE
    assert entry.body["timings"]["queue_ms"] >= ENDED_UNSEEN_AFTER_S * 1000
    # a gateway that was there after all (its Redis out of reach for 20 s) answers a clear, retryable 503
    error = worker_error(result)
    assert error.status == 503 and error.headers["Retry-After"] == "1" and "try again" in error.message


@pytest.mark.parametrize("gateway", ["there", "unknown (older than the heartbeat)", "no reply channel"])
def test_a_waited_job_whose_gateway_is_there_or_not_known_is_generated(store, model, client, monkeypatch, gateway):
    generated = counting_generations(model, monkeypatch)
    reply_to = {"there": lambda: live_gateway(client), "no reply channel": lambda: ""}.get(gateway, channel_name)()
    result = run(waited_job(reply_to), model, store, client)
    assert result.status == STATUS_COMPLETED and result.completion_tokens == 6 and len(generated) == 1


def test_a_job_taken_at_once_does_not_ask_after_its_gateway(store, model, client, monkeypatch):
    """The question costs a Redis round trip: a job taken soon after it was queued (the usual case, and the
    hot path) is spared it, and runs even for a gateway that is gone (it died moments ago)."""
    generated = counting_generations(model, monkeypatch)
    asked: list[str] = []
    real_gone = RedisJobChannel.gateway_gone
    monkeypatch.setattr(RedisJobChannel, "gateway_gone", lambda self: asked.append("?") or real_gone(self))
    result = run(waited_job(killed_gateway(client), waited_s=0), model, store, client)
    assert result.status == STATUS_COMPLETED and len(generated) == 1 and asked == []


def test_a_redelivered_stream_of_a_killed_gateway_still_keeps_what_its_first_run_sent(store, model, client):
    """Its end must hold the first run's text (``worker_lost``), which a ``gateway_gone`` end would not."""
    job = waited_job(killed_gateway(client), stream=True)
    first = RedisJobChannel(client, job.request_id, streaming=True, sealer=SEALER, reply_to=job.reply_to)
    assert first.claim_start() is True
    first.publish("Once upon")
    first.flush()  # the first run sent a piece, then its worker died
    result = run(job, model, store, client)
    assert result.status == "failed" and result.error["code"] == "worker_lost"
    assert store.terminal_for(job.request_id).payload["output"] == "Once upon"


def test_a_killed_gateway_s_channel_is_read_gone_only_once_its_time_ran_out(client):
    channel = live_gateway(client)
    assert RedisJobChannel(client, "r", streaming=False, sealer=SEALER, reply_to=channel).gateway_gone() is False
    assert client.eval(GATEWAY_BEAT_SCRIPT, 1, GATEWAYS_KEY, channel, 0, GATEWAY_FORGET_AFTER_S) == 1  # stopped
    assert RedisJobChannel(client, "r", streaming=False, sealer=SEALER, reply_to=channel).gateway_gone() is True


def test_a_refusing_redis_cannot_say_and_the_job_runs(redis_server):
    """Redis unreachable (a closed port): the job is not dropped on a guess."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        assert RedisJobChannel(dead, "r", streaming=False, sealer=SEALER,
                               reply_to=channel_name()).gateway_gone() is False
    finally:
        dead.close()


@pytest.mark.anyio
async def test_the_gateway_beats_while_open_and_says_it_is_gone_at_its_stop(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    sync = redis.Redis.from_url(redis_server.url)
    channel = channel_name()
    try:
        beat = GatewayBeat(client, channel, interval_s=0.05)
        await beat.start()
        now = sync.time()[0]
        first = sync.zscore(GATEWAYS_KEY, channel)
        assert now + GATEWAY_BEAT_TTL_S - 2 <= first <= now + GATEWAY_BEAT_TTL_S + 1
        reader = RedisJobChannel(sync, "r", streaming=False, sealer=SEALER, reply_to=channel)
        assert reader.gateway_gone() is False
        deadline = time.monotonic() + 10
        while sync.zscore(GATEWAYS_KEY, channel) == first and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # beats again (its score moves with Redis's clock, a second at a time)
        assert sync.zscore(GATEWAYS_KEY, channel) > first
        await beat.aclose()
        assert reader.gateway_gone() is True and sync.zscore(GATEWAYS_KEY, channel) <= sync.time()[0]
    finally:
        await client.aclose()
        sync.close()


def test_members_gone_for_longer_than_any_job_waits_are_dropped_by_the_next_beat(client):
    old = channel_name()
    client.zadd(GATEWAYS_KEY, {old: client.time()[0] - GATEWAY_FORGET_AFTER_S - 10})
    recent = killed_gateway(client)
    live_gateway(client)
    assert client.zscore(GATEWAYS_KEY, old) is None and client.zscore(GATEWAYS_KEY, recent) is not None


@pytest.mark.parametrize("level", ["full", "redacted", "hash", "none"])
@pytest.mark.parametrize("end", ["gateway_gone", "expired"])
def test_an_end_recorded_before_generating_keeps_the_output_as_its_level_says(store, model, client, level, end):
    """``hash`` (and an unknown level, treated so) keeps no payload: a bare ``"output": ""`` made one, with its
    salt, on these two ends alone (probe s56)."""
    job = waited_job(killed_gateway(client) if end == "gateway_gone" else live_gateway(client))
    job = replace(job, prompt_logging=level,
                  deadline_ns=time.time_ns() - 1_000_000_000 if end == "expired" else job.deadline_ns)
    result = run(job, model, store, client)
    assert result.error["code"] == end
    [entry] = store.entries_for(job.request_id)
    if level in ("full", "redacted"):
        assert entry.payload is not None and entry.payload["output"] == ""
        assert "output_chars" not in entry.body
    else:
        assert entry.payload is None and entry.body["output_chars"] == 0 and "output" not in entry.body
