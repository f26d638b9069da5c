"""What a client is told for a job that ended without its output, by how it ended."""

from __future__ import annotations

from gateway.requests.refusals import worker_error
from workers.contract.jobs import STATUS_TIMED_OUT, JobResult


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
