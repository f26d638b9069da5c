"""A job ends its request exactly once, whoever else tries (real model, real store)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
import uuid

import pytest
import redis

from audit import AuditStore, make_engine, migrate, verify_chain
from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from workers.contract.jobs import ENDED_UNSEEN_AFTER_S, STATUS_COMPLETED, GenerateJob, runs_key
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer
from workers.generation import _received_instead, run_job
from workers.streams import RedisJobChannel


def job(request_id: str, **params) -> GenerateJob:
    return GenerateJob(request_id=request_id, model="tiny-test", endpoint="chat.completions",
                       params=SamplingParams(**{"max_tokens": 6, "temperature": 0, **params}), principal="alice", team="research",
                       policy_revision="rev", messages=[{"role": "user", "content": "Hello"}])


def test_a_job_writes_one_completion(store, model):
    result = run_job(job("r1"), model, store)
    assert result.status == STATUS_COMPLETED and result.completion_tokens == 6
    terminal = store.terminal_for("r1")
    assert terminal.kind == "completion" and terminal.seq == result.audit_seq
    assert terminal.payload["output"] == result.text
    assert terminal.body["usage"] == {"prompt_tokens": result.prompt_tokens, "completion_tokens": 6,
                                      "total_tokens": result.prompt_tokens + 6}


def test_a_redelivered_job_is_answered_from_the_log_not_regenerated(store, model):
    first = run_job(job("r2"), model, store)
    second = run_job(job("r2"), model, store)
    assert second == first
    assert [e.kind for e in store.entries_for("r2")] == ["completion"]


def test_a_job_the_gateway_already_timed_out_is_not_generated(store, model):
    store.append("timed_out", "r3", principal="alice", team="research", model="tiny-test",
                 body={"error": {"code": "timed_out"}}, policy_revision="rev")
    result = run_job(job("r3"), model, store)
    assert result.status == "timed_out"
    assert [e.kind for e in store.entries_for("r3")] == ["timed_out"]


def test_a_prompt_too_long_fails_once_with_a_clear_code(store, model):
    long_job = job("r4", max_tokens=model.context_length)
    result = run_job(long_job, model, store)
    assert result.status == "failed"
    assert result.error["code"] == "context_length_exceeded"
    assert store.terminal_for("r4").kind == "failed"
    assert verify_chain(store).ok


def test_a_gateway_timeout_during_generation_wins_and_the_output_is_dropped(store, model, monkeypatch):
    real_stream = model.stream

    def stream_while_the_gateway_gives_up(prompt, params):
        store.append("timed_out", "r5", principal="alice", team="research", model="tiny-test",
                     body={"error": {"code": "timed_out"}}, policy_revision="rev")
        return real_stream(prompt, params)

    monkeypatch.setattr(model, "stream", stream_while_the_gateway_gives_up)
    result = run_job(job("r5"), model, store)
    assert result.status == "timed_out"
    assert [e.kind for e in store.entries_for("r5")] == ["timed_out"]


def test_a_job_whose_runs_ended_their_worker_twice_is_recorded_failed_not_run_a_third_time(store, model,
                                                                                         redis_server, monkeypatch):
    """Each earlier run began (its state key says so) and ended its worker before it finished, as a prompt
    that crashes the backend would: the second run goes ahead, the third is refused with ``worker_lost``."""
    client = redis.Redis.from_url(redis_server.url)
    once, twice = f"r6-{uuid.uuid4().hex}", f"r7-{uuid.uuid4().hex}"  # the suite's Redis is shared: ids of their own
    try:
        sealer = Sealer(os.urandom(32))
        first = RedisJobChannel(client, once, streaming=False, sealer=sealer)
        assert first.claim_start() is True  # run 1 begins; its worker dies (nothing is recorded)
        second = run_job(job(once), model, store, RedisJobChannel(client, once, streaming=False, sealer=sealer))
        assert second.status == STATUS_COMPLETED  # run 2: one death may be anything (a restart, the OOM killer)
        assert [e.kind for e in store.entries_for(once)] == ["completion"]

        assert RedisJobChannel(client, twice, streaming=False, sealer=sealer).claim_start() is True  # run 1 dies
        client.incr(runs_key(twice))  # run 2 began, and died too
        generated: list[str] = []
        real_stream = model.stream

        def stream_and_note(prompt, params):
            generated.append(prompt)
            return real_stream(prompt, params)

        monkeypatch.setattr(model, "stream", stream_and_note)
        third = run_job(job(twice), model, store, RedisJobChannel(client, twice, streaming=False, sealer=sealer))
        assert generated == []  # not run a third time
        assert third.status == "failed" and third.error["code"] == "worker_lost"
        assert "2 earlier runs never finished" in third.error["message"]
        assert [e.kind for e in store.entries_for(twice)] == ["failed"]
        assert verify_chain(store).ok
    finally:
        client.close()


def test_a_job_claimed_before_its_deadline_is_generated_though_its_process_was_held_up_after_the_claim(
        store, model, redis_server, monkeypatch):
    """The claim is what a gateway's timeout sees (``SET … GET`` answers "started": it then waits for this
    run's counts), so the deadline is judged at the take. Here the worker's process is held up right after
    its claim until past the deadline (as a busy machine, or a stopped process, can): the run must still
    generate and record its completion, not call itself ``expired`` (test_timeout_charges once failed so)."""
    client = redis.Redis.from_url(redis_server.url)
    request_id = f"r8-{uuid.uuid4().hex}"
    deadline_ns = time.time_ns() + 200_000_000
    channel = RedisJobChannel(client, request_id, streaming=False, sealer=Sealer(os.urandom(32)))
    real_claim = channel.claim_start

    def claim_then_held_up() -> bool:
        first = real_claim()
        time.sleep(max(0.0, (deadline_ns - time.time_ns()) / 1e9) + 0.05)
        return first

    monkeypatch.setattr(channel, "claim_start", claim_then_held_up)
    try:
        result = run_job(dataclasses.replace(job(request_id), deadline_ns=deadline_ns), model, store, channel)
    finally:
        client.close()
    assert result.status == STATUS_COMPLETED, result.error
    assert [e.kind for e in store.entries_for(request_id)] == ["completion"]


def test_an_end_the_locked_database_refuses_answers_with_what_the_model_ran(tmp_path, model):
    """The database refuses the terminal entry past its busy timeout: the client gets nothing, but the answer
    carries the generated tokens, so the gateway charges them (an audit outage does not make generation free)."""
    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=0.3)
    migrate(engine)
    store = AuditStore(engine)
    probe = run_job(job("r8"), model, store)  # what the same job generates when the database takes it
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")  # a long transaction elsewhere holds the write lock
    try:
        refused = run_job(job("r9"), model, store)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        assert refused.status == "failed" and refused.error["code"] == "audit_unavailable"
        assert refused.text == ""  # nothing served unaudited
        assert (refused.prompt_tokens, refused.completion_tokens) == (probe.prompt_tokens, probe.completion_tokens)
        assert refused.completion_tokens == 6
        assert store.terminal_for("r9") is None
    finally:
        engine.dispose()


def test_a_first_run_of_a_job_that_waited_long_is_answered_from_an_end_its_gateway_recorded_alone(store, model,
                                                                                                  monkeypatch):
    """A gateway that could not reach Redis at its stop records the end of a queued request in the database
    alone (nothing in Redis flags the job): the first run that takes the job later finds it and does not
    generate (probe p1 F1). Before, only a redelivery asked the database, and the job ran and was charged."""
    store.append("cancelled", "r10", principal="alice", team="research", model="tiny-test",
                 body={"error": {"code": "cancelled", "message": "the gateway stopped before a worker took the "
                                                                 "request"}}, policy_revision="rev")

    generated: list[str] = []
    real_stream = model.stream
    monkeypatch.setattr(model, "stream", lambda prompt, params: generated.append(prompt) or
                        real_stream(prompt, params))
    waited = dataclasses.replace(job("r10"), enqueued_at_ns=time.time_ns() - int((ENDED_UNSEEN_AFTER_S + 5) * 1e9))
    result = run_job(waited, model, store)  # a first run: the silent channel claims every start
    assert generated == []  # (a generation would lose at the unique constraint: the same end, the model run)
    assert result.status == "cancelled" and result.completion_tokens == 0
    assert [e.kind for e in store.entries_for("r10")] == ["cancelled"]


def test_a_job_whose_look_for_an_earlier_end_the_database_refuses_is_an_audit_outage_not_a_worker_error(
        tmp_path, model, monkeypatch, redis_server):
    """A job that waited long asks the database whether its request already ended; a database that cannot
    answer (frozen, locked) made the task fail, and the gateway answered 502 ``worker_error`` and recorded it
    so (probe s59 G1, a frozen PostgreSQL). It is the audit store's outage: ``audit_unavailable`` (503), nothing
    generated, its end kept for when the database is back."""
    from workers.contract.pending_terminals import PendingTerminals

    path = tmp_path / "held.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=0.3)
    migrate(engine)
    store = AuditStore(engine)
    generated: list[str] = []
    monkeypatch.setattr(model, "stream", lambda prompt, params: generated.append(prompt) or iter(()))
    client = redis.Redis.from_url(redis_server.url)
    sealer = Sealer(os.urandom(32))
    pending = PendingTerminals(client, horizon_s=60, seal=sealer.seal, unseal=sealer.unseal)
    waited = dataclasses.replace(job("r12"), enqueued_at_ns=time.time_ns() - int((ENDED_UNSEEN_AFTER_S + 5) * 1e9))
    engine.dispose()
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # not even a read gets in
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run_job(waited, model, store, pending=pending)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        assert result.status == "failed" and result.error["code"] == "audit_unavailable", result
        assert (result.prompt_tokens, result.completion_tokens) == (0, 0) and generated == []
        assert pending.holds("r12") and store.terminal_for("r12") is None  # kept for when the database is back
        assert pending.write_one(store, "r12") is not None
        ended = store.terminal_for("r12")
        assert ended is not None and ended.kind == "failed" and ended.body["error"]["code"] == "audit_unavailable"
    finally:
        engine.dispose()
        client.close()


def test_a_first_run_taken_at_once_does_not_ask_the_database_before_it_generates(store, model, monkeypatch):
    """The look-up above costs a database round trip: a job taken soon after it was queued (the usual case)
    is spared it."""
    looked: list[str] = []
    real_terminal_for = store.terminal_for
    monkeypatch.setattr(store, "terminal_for", lambda request_id: looked.append(request_id) or
                        real_terminal_for(request_id))
    result = run_job(dataclasses.replace(job("r11"), enqueued_at_ns=time.time_ns()), model, store)
    assert result.status == STATUS_COMPLETED and result.completion_tokens == 6
    assert looked == []


@pytest.mark.parametrize("stream, logging_level, kept", [
    (True, "full", {}),  # the stream's gateway records what it released (its delivered entry)
    (False, "full", {"client_output": ""}),  # a non-streamed client was answered 503: nothing
    (False, "hash", {"client_output_chars": 0}),
])
def test_a_checked_completion_kept_for_later_does_not_claim_the_verdict_s_text_reached_its_client(
        stream, logging_level, kept):
    """A checked completion whose end the database refused is answered ``audit_unavailable``, not with the
    verdict's text: the kept end must not say the client received that text (a served test found a stream's
    kept end claiming the whole output while the client lacked its last window)."""
    checked = dataclasses.replace(job("r-kept"), check_output=True, stream=stream, prompt_logging=logging_level)
    body = {"finish_reason": "stop", "output": "the whole text", "client_output": "the whole text",
            "output_decision": {"allow": True}}
    assert _received_instead(checked, body, None) == {"finish_reason": "stop", "output": "the whole text",
                                                      "output_decision": {"allow": True}, **kept}
