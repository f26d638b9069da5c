"""The gateway's sealed task argument is the one ``GenerateJob.sealed`` would give."""

from __future__ import annotations

import json
import os
from dataclasses import fields

from gateway.dispatch.job_payload import job_payload, sealed_job
from workers.contract.jobs import GenerateJob
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer


def _job(**changes) -> GenerateJob:
    """A job with every field set away from its default."""
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, stop=("\n", "END"), seed=11,
                            repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.3)
    values = dict(request_id="r1", model="m", endpoint="chat.completions", params=params, principal="p",
                  team="t", policy_revision="rev", messages=[{"role": "user", "content": "hi"}], prompt=None,
                  enqueued_at_ns=5, stream=True, prompt_logging="digest",
                  redact=[{"detector": "email", "text": "a@b.c"}], deadline_ns=9, reply_to="chan", check_output=True,
                  output_rule_absent=True, gateway_records=True)
    values.update(changes)
    return GenerateJob(**values)


def test_every_field_is_set_away_from_its_default() -> None:
    """Guards the next test: a new field left at its default would hide a missing one.

    ``prompt`` is None in a chat job; the text job in the next test sets it.
    """
    job, default = _job(), GenerateJob(request_id="r1", model="m", endpoint="e", params=SamplingParams(1),
                                       principal="p", team=None, policy_revision="rev")
    assert all(getattr(job, f.name) != getattr(default, f.name) for f in fields(GenerateJob)
               if f.name not in {"request_id", "model", "principal", "policy_revision", "prompt"})
    assert all(getattr(job.params, f.name) != getattr(default.params, f.name) for f in fields(SamplingParams))


def test_payload_equals_to_payload() -> None:
    job = _job()
    assert job_payload(job) == job.to_payload()
    assert json.dumps(job_payload(job)) == json.dumps(job.to_payload())
    text_job = _job(endpoint="completions", messages=None, prompt="once upon", team=None, redact=[])
    assert job_payload(text_job) == text_job.to_payload()
    unflagged = _job(output_rule_absent=False, gateway_records=False)
    assert job_payload(unflagged) == unflagged.to_payload()


def test_sealed_job_opens_as_the_job() -> None:
    sealer = Sealer(os.urandom(32))
    job = _job()
    sealed = sealed_job(job, sealer)
    reference = job.sealed(sealer)
    assert {k: v for k, v in sealed.items() if k != "sealed"} == {k: v for k, v in reference.items()
                                                                   if k != "sealed"}
    assert GenerateJob.unsealed(sealed, sealer) == job


def test_the_optional_flags_travel_only_when_set() -> None:
    """A worker that predates a flag can still read every job that does not need it, from either builder."""
    plain = _job(output_rule_absent=False, gateway_records=False)
    for payload in (plain.to_payload(), job_payload(plain)):
        assert "output_rule_absent" not in payload and "gateway_records" not in payload
        assert GenerateJob.from_payload(payload) == plain
    flagged = GenerateJob.from_payload(job_payload(_job()))
    assert flagged.output_rule_absent is True and flagged.gateway_records is True


def test_sampling_params_payload_holds_every_field_and_reads_back() -> None:
    params = _job().params
    payload = params.to_payload()
    assert payload == {**{f.name: getattr(params, f.name) for f in fields(SamplingParams)}, "stop": ["\n", "END"]}
    assert list(payload) == [f.name for f in fields(SamplingParams)]
    assert SamplingParams.from_payload(json.loads(json.dumps(payload))) == params
