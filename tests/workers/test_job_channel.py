"""A job's start claim and cancel flag share one Redis key (``workers/streams.py``), real Redis.

The worker's claim reads the cancel flag in the same command; the tests pin
what each state of the key answers, that a cancel is never lost to the
claim, and that the claim costs one command.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from bench._commandstats import CommandProbe
from tests.own_redis import module_redis_server  # noqa: F401  (fixture: commands are counted server-wide)
from workers.contract.jobs import CANCEL_TTL_S, cancel_key, runs_key
from workers.contract.sealing import Sealer
from workers.streams import RedisJobChannel


@pytest.fixture
def client(redis_server):
    redis_client = redis.Redis.from_url(redis_server.url)
    try:
        yield redis_client
    finally:
        redis_client.close()


def channel(client: redis.Redis, request_id: str) -> RedisJobChannel:
    return RedisJobChannel(client, request_id, streaming=False, sealer=Sealer(os.urandom(32)))


def gateway_cancels(client: redis.Redis, request_id: str) -> None:
    """What ``gateway.requests.outcome`` writes when the client went away."""
    client.set(cancel_key(request_id), b"1", ex=CANCEL_TTL_S)


def test_a_first_run_claims_with_one_command_and_a_redelivery_is_told_apart(client, redis_server) -> None:
    request_id = uuid.uuid4().hex
    probe = CommandProbe(redis_server.url)
    client.ping()
    probe.start()
    first = channel(client, request_id)
    assert first.claim_start() is True
    assert probe.stop() == {"set": 1}
    assert first.cancel_requested() is False
    assert 0 < client.ttl(cancel_key(request_id)) <= CANCEL_TTL_S
    again = channel(client, request_id)  # the job redelivered: generation had begun
    assert again.claim_start() is False
    assert again.cancel_requested() is False


def test_a_cancel_before_the_start_is_seen_by_the_claim_and_kept_for_a_redelivery(client) -> None:
    request_id = uuid.uuid4().hex
    gateway_cancels(client, request_id)
    job = channel(client, request_id)
    # whether an earlier run began is unknown: not a first run (the database is asked)
    assert job.claim_start() is False
    assert job.cancel_requested() is True
    redelivered = channel(client, request_id)  # its worker died before recording the cancel
    assert redelivered.claim_start() is False
    assert redelivered.cancel_requested() is True
    assert client.get(cancel_key(request_id)) == b"1"


def test_a_cancel_during_generation_is_seen_at_the_next_look(client, monkeypatch) -> None:
    request_id = uuid.uuid4().hex
    job = channel(client, request_id)
    assert job.claim_start() is True
    assert job.cancel_requested() is False  # the look the claim made
    gateway_cancels(client, request_id)
    monkeypatch.setattr("workers.streams.CANCEL_CHECK_INTERVAL_S", 0)
    job._next_check = 0.0
    assert job.cancel_requested() is True


def test_a_redelivery_counts_its_run_with_two_commands_kept_as_long_as_the_job_state(client, redis_server) -> None:
    request_id = uuid.uuid4().hex
    assert channel(client, request_id).claim_start() is True  # the first run counts nothing
    assert client.exists(runs_key(request_id)) == 0
    second = channel(client, request_id)
    assert second.claim_start() is False
    probe = CommandProbe(redis_server.url)
    client.ping()
    probe.start()
    assert second.count_run() == 2
    assert probe.stop() == {"incrby": 1, "expire": 1}  # redis-py sends INCR as INCRBY 1
    third = channel(client, request_id)
    assert third.claim_start() is False
    assert third.count_run() == 3
    assert 0 < client.ttl(runs_key(request_id)) <= CANCEL_TTL_S


def test_a_run_that_cannot_be_counted_goes_ahead(client) -> None:
    broken = redis.Redis(unix_socket_path="/nonexistent/redis.sock", socket_connect_timeout=0.2)
    job = RedisJobChannel(broken, uuid.uuid4().hex, streaming=False, sealer=Sealer(os.urandom(32)))
    assert job.count_run() is None
