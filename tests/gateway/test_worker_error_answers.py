"""What a client is told for a job that ended without its output, by how it ended."""

from __future__ import annotations

from gateway.requests.refusals import worker_error
from workers.contract.jobs import STATUS_FAILED, STATUS_TIMED_OUT, STREAM_WORKER_LOST, WORKER_LOST, JobResult


def test_a_job_that_expired_in_the_queue_is_not_told_it_hit_the_time_limit() -> None:
    # it never ran: "ask for fewer tokens" (and a do-not-retry) was advice for a generation that ran too long
    expired = worker_error(JobResult(status=STATUS_TIMED_OUT, audit_seq=7, error={
        "code": "expired", "message": "the request's deadline passed before a worker took it"}))
    assert (expired.status, expired.code) == (504, "timed_out")
    assert "expired in the queue" in expired.message and "max_tokens" not in expired.message
    assert "x-should-retry" not in {name.lower() for name in expired.headers}
    limited = worker_error(JobResult(status=STATUS_TIMED_OUT, audit_seq=8, error={
        "code": "timed_out", "message": "generation hit the worker's time limit"}))
    assert (limited.status, limited.code) == (504, "timed_out")
    assert "max_tokens" in limited.message and limited.headers.get("x-should-retry") == "false"


def test_a_stream_whose_worker_died_once_is_not_told_never_to_retry() -> None:
    """Both end ``worker_lost``; only a job whose runs kept ending their workers is worth not running again."""
    once = worker_error(JobResult(status=STATUS_FAILED, audit_seq=9, error={"code": WORKER_LOST,
                                                                            "message": STREAM_WORKER_LOST}))
    assert (once.status, once.code) == (502, WORKER_LOST)
    assert "more than once" not in once.message and "a retry may succeed" in once.message
    assert "x-should-retry" not in {name.lower() for name in once.headers}
    poison = worker_error(JobResult(status=STATUS_FAILED, audit_seq=10, error={
        "code": WORKER_LOST, "message": "this job's 3 earlier runs never finished (their worker died or stalled)"}))
    assert "more than once" in poison.message and poison.headers.get("x-should-retry") == "false"
