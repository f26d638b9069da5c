"""The task body hands every outcome to its gateway: a result, or the exception it raised (real Redis).

``workers.runtime.generate`` (its body: ``workers.pool.generate``) stores and publishes the outcome on the job's
reply channel (``workers/replies.py``); Celery keeps none. A task that
raises must still end its gateway's wait, or the client would wait for the
request timeout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest
import redis

from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from tests.workers.test_worker_jobs import job
from workers import pool, runtime
from workers.contract.jobs import REPLY_RESULT, STATUS_COMPLETED, open_result, parse_reply, result_key
from workers.contract.sealing import Sealer


@pytest.fixture
def worker_state(monkeypatch, redis_server, model, store):  # noqa: F811
    client = redis.Redis.from_url(redis_server.url)
    sealer = Sealer(os.urandom(32))
    config = runtime.WorkerConfig(model=model.spec, redis_url=redis_server.url, database_url="sqlite://")
    for name, value in {"config": config, "model": model, "store": store, "redis": client, "sealer": sealer,
                        "digester": None, "pending": None}.items():
        monkeypatch.setattr(pool._state, name, value)
    yield client, sealer
    client.close()


def _heard(pubsub) -> tuple[str, str, dict]:
    """The first message on the channel (the subscription's own confirmation is skipped)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            kind, request_id, data = parse_reply(message["data"])
            return kind, request_id, json.loads(data)
    raise AssertionError("nothing was published on the reply channel")


def test_a_result_is_stored_and_published_on_the_reply_channel(worker_state, model):  # noqa: F811
    client, sealer = worker_state
    pubsub = client.pubsub()
    pubsub.subscribe("govgate:gateway:test-ok")
    sent = replace(job("to-ok"), model=model.spec.name, reply_to="govgate:gateway:test-ok")
    assert runtime.generate(sent.sealed(sealer)) is None
    kind, request_id, outcome = _heard(pubsub)
    pubsub.close()
    assert (kind, request_id, outcome["status"]) == (REPLY_RESULT, "to-ok", "SUCCESS")
    assert open_result(outcome["result"], sealer)["status"] == STATUS_COMPLETED
    assert json.loads(client.get(result_key("to-ok"))) == outcome


def test_a_task_that_raises_still_ends_the_wait(worker_state):
    client, sealer = worker_state
    pubsub = client.pubsub()
    pubsub.subscribe("govgate:gateway:test-raise")
    sent = replace(job("to-raise"), model="another-model", reply_to="govgate:gateway:test-raise")
    with pytest.raises(ValueError, match="another-model"):
        runtime.generate(sent.sealed(sealer))
    kind, request_id, outcome = _heard(pubsub)
    pubsub.close()
    assert (kind, request_id, outcome["status"]) == (REPLY_RESULT, "to-raise", "FAILURE")
    assert outcome["result"]["exc_type"] == "ValueError"


@pytest.mark.parametrize("interval_s", [3600.0, 0.0])
def test_a_stream_is_sent_in_pieces_as_the_workers_setting_says(worker_state, model, monkeypatch,
                                                                interval_s):  # noqa: F811
    client, sealer = worker_state
    monkeypatch.setattr(pool._state, "config", replace(pool._state.config, stream_flush_interval_s=interval_s))
    pubsub = client.pubsub()
    pubsub.subscribe("govgate:gateway:test-pieces")
    sent = replace(job(f"to-pieces-{interval_s:g}", max_tokens=12), model=model.spec.name, stream=True,
                   reply_to="govgate:gateway:test-pieces")
    assert runtime.generate(sent.sealed(sealer)) is None
    kinds: list[str] = []
    deadline = time.monotonic() + 10
    while REPLY_RESULT not in kinds and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            kinds.append(parse_reply(message["data"])[0])
    pubsub.close()
    assert kinds[-1] == REPLY_RESULT
    pieces = len(kinds) - 1
    outcome = open_result(json.loads(client.get(result_key(sent.request_id)))["result"], sealer)
    assert outcome["completion_tokens"] == 12
    # an hour's interval: the first token at once, the rest together before the end; none: token by token
    assert pieces == 2 if interval_s else pieces > 2
