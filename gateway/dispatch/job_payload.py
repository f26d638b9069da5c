"""A queued job's sealed task argument, built without ``dataclasses.asdict``.

``GenerateJob.sealed`` builds the payload with ``asdict``, which deep-copies
every message dict and the sampling settings twice only for them to be JSON
encoded at once; on the gateway's request path that was about a tenth of a
millisecond of CPU per request. Here the fields are read as they are (the
payload is encoded immediately and never kept). The result is the same
document ``GenerateJob.sealed`` gives: ``tests/gateway/test_job_payload.py``
holds it equal, for every field, so a new field cannot be left out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgspec

from workers.contract.jobs import OPTIONAL_FLAGS, GenerateJob
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer

_JOB_FIELDS = tuple(f.name for f in fields(GenerateJob))
_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))


def job_payload(job: GenerateJob) -> dict[str, Any]:
    """``job.to_payload()``, read field by field (no copies); flags a worker may predate only when set."""
    payload = {name: getattr(job, name) for name in _JOB_FIELDS}
    for name in OPTIONAL_FLAGS:
        if not payload[name]:
            del payload[name]
    params = job.params
    payload["params"] = {name: getattr(params, name) for name in _PARAM_FIELDS}
    payload["params"]["stop"] = list(params.stop)
    return payload


def sealed_job(job: GenerateJob, sealer: Sealer) -> dict[str, Any]:
    """``job.sealed(sealer)``: ids and reply channel in clear, everything else sealed."""
    return {"request_id": job.request_id, "model": job.model, "reply_to": job.reply_to,
            "sealed": sealer.seal_text(msgspec.json.encode(job_payload(job)))}
