"""A job's result payload is every field of :class:`JobResult`, as ``dataclasses.asdict`` would give it."""

from __future__ import annotations

from dataclasses import asdict

from workers.contract.jobs import JobResult


def test_the_payload_is_what_asdict_gives_and_round_trips():
    result = JobResult(status="failed", text="partial", finish_reason="length", prompt_tokens=3,
                       completion_tokens=2, audit_seq=7, error={"code": "worker_error", "message": "boom"})
    payload = result.to_payload()
    assert payload == asdict(result)
    assert JobResult.from_payload(payload) == result
    payload["error"]["code"] = "changed"  # a copy: the result itself is not changed through it
    assert result.error["code"] == "worker_error"
