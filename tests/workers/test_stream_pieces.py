"""A stream's text travels in pieces at most every flush interval (``workers/streams.py``), real Redis.

What the worker publishes on the gateway's reply channel and mirrors in its
list, read back as the gateway and a redelivery read them: tokens made
within the interval go as one piece, the first never waits, ``flush`` sends
the rest, and the pieces always add up to the generated text. The clock is
the module's own ``time.monotonic``, replaced where a test needs time to pass.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
import redis

from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from tests.workers.test_job_channel import client  # noqa: F401  (a client of the suite's Redis)
from workers import streams
from workers.contract.jobs import REPLY_PIECE, GenerateJob, open_piece, parse_reply
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.generation import run_job
from workers.streams import RedisJobChannel

SEALER = Sealer(os.urandom(32))


class Listener:
    """The gateway's side of a reply channel: the pieces published on it, in order."""

    def __init__(self, client: redis.Redis) -> None:
        self.channel = f"govgate:gateway:{uuid.uuid4().hex}"
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(self.channel)
        self._pubsub.get_message(timeout=5)  # the subscribe confirmation

    def pieces(self, expected: int) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < expected and time.monotonic() < deadline:
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                kind, _request_id, data = parse_reply(message["data"])
                assert kind == REPLY_PIECE
                got.append(open_piece(SEALER, data))
        # nothing more arrives
        assert self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
        return got

    def close(self) -> None:
        self._pubsub.close()


@pytest.fixture
def listener(client):
    listening = Listener(client)
    try:
        yield listening
    finally:
        listening.close()


def stream_channel(client: redis.Redis, listener: Listener, interval_s: float) -> RedisJobChannel:
    return RedisJobChannel(client, uuid.uuid4().hex, streaming=True, sealer=SEALER, reply_to=listener.channel,
                           flush_interval_s=interval_s)


def test_tokens_made_within_the_interval_travel_as_one_piece_after_a_first_that_never_waits(
        client, listener) -> None:
    channel = stream_channel(client, listener, interval_s=3600)
    for token in ["Once", " upon", " a", " time"]:
        channel.publish(token)
    assert listener.pieces(1) == ["Once"]  # the first at once; the rest waits for the interval
    channel.flush()
    channel.flush()  # nothing left: sends nothing
    assert listener.pieces(1) == [" upon a time"]
    assert channel.streamed_text() == "Once upon a time"  # the mirror a redelivery reads
    channel.forget()


def test_a_piece_goes_once_the_interval_has_passed_with_what_waited_before_it(client, listener,
                                                                                monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(streams.time, "monotonic", lambda: now[0])
    channel = stream_channel(client, listener, interval_s=0.010)
    for at, token in [(100.000, "a"), (100.004, "b"), (100.009, "c"), (100.0105, "d"), (100.015, "e"),
                      (100.0215, "f"), (100.025, "g")]:
        now[0] = at
        channel.publish(token)
    assert listener.pieces(3) == ["a", "bcd", "ef"]  # "g" waits: 3.5 ms after the last piece
    now[0] = 100.026
    channel.flush()
    assert listener.pieces(1) == ["g"]
    assert channel.streamed_text() == "abcdefg"
    channel.forget()


def test_an_interval_of_zero_sends_every_token_on_its_own(client, listener) -> None:
    channel = stream_channel(client, listener, interval_s=0)
    for token in ["x", "y", "z"]:
        channel.publish(token)
    assert listener.pieces(3) == ["x", "y", "z"]
    channel.flush()
    assert listener.pieces(0) == []
    channel.forget()


def streamed_job(request_id: str, reply_to: str, max_tokens: int = 24) -> GenerateJob:
    return GenerateJob(request_id=request_id, model="tiny-test", endpoint="completions",
                       params=SamplingParams(max_tokens=max_tokens, temperature=0), principal="alice",
                       team="research", policy_revision="rev", prompt="Once upon a time", prompt_logging="full",
                       stream=True, reply_to=reply_to)


def test_a_generated_stream_arrives_whole_in_fewer_pieces_than_tokens(client, listener, store, model) -> None:
    request_id = uuid.uuid4().hex
    job = streamed_job(request_id, listener.channel)
    channel = RedisJobChannel(client, request_id, streaming=True, sealer=SEALER, reply_to=listener.channel,
                              flush_interval_s=3600)
    result = run_job(job, model, store, channel)
    assert result.completion_tokens > 2 and result.text
    # the first token at once, everything else flushed before the end was recorded
    pieces = listener.pieces(2)
    assert len(pieces) == 2 and "".join(pieces) == result.text
    assert store.terminal_for(request_id).payload["output"] == result.text


def test_a_stream_cancelled_mid_generation_has_sent_all_it_records(client, listener, store, model) -> None:
    class CancelAfterThirdToken(RedisJobChannel):
        tokens = 0

        def publish(self, text: str) -> None:
            self.tokens += 1
            super().publish(text)

        def cancel_requested(self) -> bool:
            return self.tokens >= 3

    request_id = uuid.uuid4().hex
    channel = CancelAfterThirdToken(client, request_id, streaming=True, sealer=SEALER, reply_to=listener.channel,
                                    flush_interval_s=3600)
    result = run_job(streamed_job(request_id, listener.channel), model, store, channel)
    entry = store.terminal_for(request_id)
    assert entry.kind == "cancelled"
    pieces = listener.pieces(2)
    assert len(pieces) == 2 and "".join(pieces) == entry.payload["output"] == result.text != ""


def test_a_stream_whose_channel_loses_redis_is_recorded_failed_as_a_relay_failure(client, listener, store, model,
                                                                                   caplog) -> None:
    """Redis gone mid-stream is the channel's failure, not a model bug: a warning, not a "crashed" traceback."""
    class LosesRedisAtThirdToken(RedisJobChannel):
        tokens = 0

        def publish(self, text: str) -> None:
            self.tokens += 1
            if self.tokens == 3:
                raise redis.ConnectionError("Error while reading from redis.sock : (104, 'Connection reset by peer')")
            super().publish(text)

    request_id = uuid.uuid4().hex
    channel = LosesRedisAtThirdToken(client, request_id, streaming=True, sealer=SEALER, reply_to=listener.channel,
                                     flush_interval_s=0)
    with caplog.at_level("WARNING", logger="workers.generation"):
        result = run_job(streamed_job(request_id, listener.channel), model, store, channel)
    entry = store.terminal_for(request_id)
    assert entry.kind == "failed" and result.status == "failed"
    assert entry.body["error"]["code"] == "worker_error"
    assert entry.body["error"]["message"].startswith("the job's channel to its gateway failed (Redis): ConnectionError")
    sent = listener.pieces(2)
    assert len(sent) == 2 and entry.payload["output"].startswith("".join(sent))  # what reached the client is kept
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert any("channel to the gateway failed mid-generation" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    # The model is free for the next job. The run was left open: the log record's argument (the exception, its
    # traceback, the frame holding the run) kept it alive, and every later job of the worker failed "already
    # generating on this thread" until the worker was killed (probe s55 F1: a Redis stall mid-stream).
    after = uuid.uuid4().hex
    channel = RedisJobChannel(client, after, streaming=True, sealer=SEALER, reply_to=listener.channel,
                              flush_interval_s=0)
    assert run_job(streamed_job(after, listener.channel), model, store, channel).status == "completed"
    assert store.terminal_for(after).kind == "completion"


def test_the_setting_is_read_bounded_and_reaches_a_child_process() -> None:
    from gateway.settings import Settings, SettingsError

    assert Settings.from_env({}).stream_flush_interval_ms == 10.0
    assert Settings.from_env({"GOVGATE_STREAM_FLUSH_INTERVAL_MS": " 0 "}).stream_flush_interval_ms == 0.0
    assert Settings.from_env({"GOVGATE_STREAM_FLUSH_INTERVAL_MS": "1000"}).stream_flush_interval_ms == 1000.0
    settings = Settings().with_(stream_flush_interval_ms=2.5)
    assert Settings.from_env(settings.to_env()).stream_flush_interval_ms == 2.5
    for value, problem in [("-1", "between 0 and 1000"), ("1001", "between 0 and 1000"), ("nan", "between"),
                           ("inf", "between"), ("soon", "not a number")]:
        with pytest.raises(SettingsError, match=f"GOVGATE_STREAM_FLUSH_INTERVAL_MS='{value}'.*{problem}"):
            Settings.from_env({"GOVGATE_STREAM_FLUSH_INTERVAL_MS": value})


def test_the_defaults_of_the_setting_the_worker_config_and_the_channel_agree() -> None:
    from gateway.settings import Settings
    from workers.runtime import WorkerConfig
    from workers.streams import STREAM_FLUSH_INTERVAL_S

    assert WorkerConfig.__dataclass_fields__["stream_flush_interval_s"].default == STREAM_FLUSH_INTERVAL_S
    assert Settings().stream_flush_interval_ms / 1000 == STREAM_FLUSH_INTERVAL_S
