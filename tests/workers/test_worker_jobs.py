"""A job ends its request exactly once, whoever else tries (real model, real store)."""

from __future__ import annotations

from audit import verify_chain
from tests.conftest_models import model, store  # noqa: F401  (shared fixtures)
from workers.contract.jobs import STATUS_COMPLETED, GenerateJob
from workers.contract.sampling import SamplingParams
from workers.generation import run_job


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
