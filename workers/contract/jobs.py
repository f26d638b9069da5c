"""The job a gateway sends and the result a worker returns, and the Redis keys around them.

Payloads are plain JSON dicts because Celery serialises them as JSON; the
dataclasses give both sides one definition of the fields (the job's sampling
settings are a :class:`~workers.contract.sampling.SamplingParams`). Whatever carries
text (the job's prompt, the result's output, stream pieces) crosses Redis
sealed (:mod:`workers.contract.sealing`): only ids stay readable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.contract.sampling import SamplingParams
from workers.contract.sealing import SealError, Sealer
from workers.contract.privacy import texts_of

#: Celery task name of a generation.
GENERATE_TASK = "govgate.generate"

#: Result statuses a task can return (failures are results, not exceptions,
#: so the gateway can map them to designed HTTP errors).
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_TIMED_OUT = "timed_out"
STATUS_CANCELLED = "cancelled"
#: The error code of a job whose earlier runs each ended their worker: recorded failed, not run again.
WORKER_LOST = "worker_lost"
#: ``worker_lost``'s message when a stream's worker died once: the gateway tells such a client a retry may succeed.
STREAM_WORKER_LOST = "the worker generating this stream died; a stream cannot be resumed"

#: Prefix of the key a worker stores a job's outcome under (sealed), next to
#: publishing it on the job's reply channel: a gateway whose pub/sub connection
#: was down when the outcome was published reads it from there.
RESULT_KEY_PREFIX = "govgate:result:"
#: How long a stored outcome is kept: longer than a gateway takes to reconnect
#: and look (seconds), short enough that Redis is no second audit log.
RESULT_TTL_S = 600
#: Kinds of message on a gateway's reply channel (see :func:`reply_message`).
REPLY_RESULT = "r"
REPLY_PIECE = "p"
#: Prefix of a job's state key: the worker sets it to ``JOB_STARTED`` when generation
#: begins; :data:`JOB_LOOK_AGAIN` (below) marks a job not started yet; any other value (the
#: gateway writes ``1`` for a client gone, ``STOP_TIMED_OUT`` at its request timeout, ``STOP_KEY_REVOKED`` at its
#: key's revocation) asks the job to stop. One key
#: for all, so the worker's start claim reads the cancel flag in the same command
#: (``workers/streams.py``).
CANCEL_KEY_PREFIX = "govgate:job:"
JOB_STARTED = b"started"
#: A third value of the state key, neither started nor a cancel: a job taken and not started yet whose
#: worker should look again for a fairer job at its start. A gateway's push that turns a fair list
#: non-empty writes it (``SET NX``: never over a start or a cancel) on the jobs the takes noted
#: (``gateway/dispatch/fair_push.py``); the start's claim reads it and only then runs the script that
#: may give way (``workers/contract/repick.py``). Every reader takes it for "not started, not cancelled".
JOB_LOOK_AGAIN = b"look-again"
#: The cancel the gateway writes when its request timeout ends a request: the worker stops as for any
#: cancel, but records the end ``timed_out`` (code ``timed_out``) with what it generated, so the request is
#: charged that (``gateway/requests/timeouts.py``, ``timed_out``). A worker that predates it
#: reads it as a plain cancel and records ``cancelled``, which the gateway charges the same way.
STOP_TIMED_OUT = b"timed-out"
#: The cancel the gateway writes when the request's API key was revoked while it was in flight
#: (``gateway/auth/revocations.py``): the worker stops as for any cancel and records ``cancelled`` with
#: :data:`KEY_REVOKED_MESSAGE`, so the audit says why. A worker that predates it reads a plain cancel.
STOP_KEY_REVOKED = b"key-revoked"
#: The error message of an end its key's revocation asked for (the worker's, and the gateway's own).
KEY_REVOKED_MESSAGE = "the request's API key was revoked while the request was in flight; generation was stopped"
#: How long a look-again mark is kept: longer than a taken job waits for its start, shorter than a job's
#: state (a mark on a job that ended long ago, noted by a worker gone since, expires sooner).
LOOK_AGAIN_TTL_S = 3600
#: How long a job's state (a cancel request included) is kept: longer than any job can wait in a queue.
CANCEL_TTL_S = 24 * 3600
#: Prefix of a job's count of runs begun after its first (a redelivery of a job whose generation had
#: begun adds one; kept as long as the job's state).
RUNS_KEY_PREFIX = "govgate:runs:"
#: Runs of one non-streamed job that may begin: the first, and one more after its worker died mid-run (an
#: out-of-memory kill, a restart). A job whose runs ended their worker this often is taken for the cause
#: (a prompt that crashes the model's backend): it is recorded ``failed``/``worker_lost`` instead of
#: ending every next worker, which `govgate up` would restart until it gave the model up.
MAX_JOB_RUNS = 2
#: A job a worker takes at least this long (seconds) after it was queued asks the database for an end of
#: its request before its first run generates. A gateway that could not reach Redis to take its job back
#: or flag it (a stop that took Redis down with the API) records the request's end in the database alone,
#: and only once the job has waited three times as long since it was queued (``gateway/requests/cancelled_ends.py``,
#: ``UNSEEN_END_AGE_S``), so the run that takes the job later always asks, even across 2 s of skew between
#: the gateway's clock (``enqueued_at_ns``) and the worker's (its take). A job taken sooner (the usual case)
#: pays no database round trip; one that waited longer pays one indexed look-up, small beside its wait.
ENDED_UNSEEN_AFTER_S = 1.0
#: Prefix of the key a worker's pool process sets once its model is loaded (``govgate up`` waits for it).
LOADED_KEY_PREFIX = "govgate:loaded:"
LOADED_TTL_S = 24 * 3600


#: Job fields sent only when set, so that a worker that predates them can still read every job that
#: does not need them (upgrade workers before gateways).
OPTIONAL_FLAGS = ("output_rule_absent", "gateway_records")


def runs_key(request_id: str) -> str:
    """The Redis key counting a job's runs after its first (:data:`MAX_JOB_RUNS`)."""
    return RUNS_KEY_PREFIX + request_id


def queue_for(model: str) -> str:
    """The Celery queue that carries one model's requests."""
    return f"model.{model}"


def result_key(request_id: str) -> str:
    return RESULT_KEY_PREFIX + request_id


def reply_message(kind: str, request_id: str, data: str) -> str:
    """One message on a gateway's reply channel: ``kind``, the request id, then the (sealed) data.

    One channel per gateway process carries every outcome and stream piece
    of its requests, so the gateway subscribes once at start instead of twice
    per request; the request id in front tells the gateway whose it is.
    """
    return f"{kind}\n{request_id}\n{data}"


def parse_reply(raw: bytes | str) -> tuple[str, str, str]:
    """``(kind, request_id, data)`` of a reply message; raises ``ValueError`` if it is not one."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    kind, request_id, data = text.split("\n", 2)
    return kind, request_id, data


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def loaded_key(model: str, worker_pid: int) -> str:
    """Set when a pool process of the worker whose main process is ``worker_pid`` has loaded ``model``."""
    return f"{LOADED_KEY_PREFIX}{model}:{worker_pid}"


@dataclass(frozen=True)
class GenerateJob:
    """One admitted request, as queued for a worker."""

    request_id: str
    model: str
    endpoint: str  # "chat.completions" | "completions"
    #: How to sample, every default filled in and ``max_tokens`` clamped by the policy.
    params: SamplingParams
    principal: str
    team: str | None
    policy_revision: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    enqueued_at_ns: int = 0
    #: Publish text pieces on the reply channel as they are generated.
    stream: bool = False
    #: The policy's ``prompt_logging`` obligation: how much of the output the terminal entry keeps.
    prompt_logging: str = "full"
    #: The policy's ``redact`` obligation (``[{detector, text}]``): texts masked in a redacted output.
    redact: list[dict[str, str]] = field(default_factory=list)
    #: Wall-clock time (ns) after which nobody waits for the result: a worker that
    #: takes the job later records it as expired instead of generating (0: none).
    deadline_ns: int = 0
    #: The pub/sub channel of the gateway process that waits for this job:
    #: the worker publishes the outcome and stream pieces there ("" publishes nothing).
    reply_to: str = ""
    #: The output rules apply: before recording, the worker reports the output to its gateway and
    #: records per the verdict (``workers/contract/output_check.py``). False for jobs queued by a
    #: gateway that predates them.
    check_output: bool = False
    #: With ``check_output``: the policy revision that admitted the job has no output rule at all, so
    #: every output passes unchecked and the worker records that verdict itself, without asking its
    #: gateway (no report, no wait). Only a gateway that knew the revision's rules sets it.
    output_rule_absent: bool = False
    #: With ``check_output``: the gateway judges a non-streamed output and records its terminal entry
    #: itself, so the worker hands the output over (``OutputReport.handed_over``) and takes its next job
    #: instead of waiting for a verdict. Only a gateway that records handed-over outputs sets it.
    gateway_records: bool = False

    def to_payload(self) -> dict[str, Any]:
        payload = {**asdict(self), "params": self.params.to_payload()}
        for name in OPTIONAL_FLAGS:
            if not payload[name]:
                del payload[name]
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "GenerateJob":
        return cls(**{**payload, "params": SamplingParams.from_payload(payload["params"])})

    def sealed(self, sealer: Sealer) -> dict[str, Any]:
        """The task argument: ids (and the reply channel) in clear, everything else sealed.

        The reply channel stays readable so a worker that cannot unseal the
        job can still tell its gateway so.
        """
        return {"request_id": self.request_id, "model": self.model, "reply_to": self.reply_to,
                "sealed": sealer.seal_text(json.dumps(self.to_payload()).encode())}

    @classmethod
    def unsealed(cls, payload: dict[str, Any], sealer: Sealer) -> "GenerateJob":
        """The job from its task argument; raises :class:`SealError` if it was not sealed with this key."""
        job = cls.from_payload(json.loads(sealer.unseal_text(payload["sealed"])))
        if job.request_id != payload.get("request_id"):
            raise SealError("sealed job does not belong to its request id")
        return job


@dataclass(frozen=True)
class JobResult:
    """What a task returns; ``error`` is set when ``status`` is not completed."""

    status: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audit_seq: int | None = None
    error: dict[str, str] = field(default_factory=dict)
    #: How long the job waited in its queue before a worker began it (the gateway's queue-wait metric).
    queue_ms: float | None = None

    def to_payload(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (what :func:`dataclasses.asdict` gives, built without its deep copies).

        Built once per task in the worker's pool process; ``asdict`` deep-copies every field.
        """
        return {"status": self.status, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "audit_seq": self.audit_seq, "error": dict(self.error), "queue_ms": self.queue_ms}

    @classmethod
    def from_terminal(cls, kind: str, seq: int, body: dict[str, Any],
                      payload: dict[str, Any] | None = None) -> "JobResult":
        """The result a request's terminal audit entry stands for (its body and its payload).

        Used when a request already ended (a redelivered task, or a late
        worker racing the gateway's timeout): the log is the source of truth.
        The output is in the entry's payload (or, in chain format 1, its body).
        """
        usage = body.get("usage", {})
        texts = texts_of(body, payload)
        if "output_decision" in body:  # checked by the output rules: the client's text is what was served
            served, masked = "client_output", body.get("client_output_masked")
        else:
            served, masked = "output", body.get("output_masked")
        if kind == "completion" and (served not in texts or masked):
            # The log keeps only a digest or a masked copy (prompt_logging): that is not the answer, and
            # serving it as one would be a false success. The request stays ended as completed.
            return cls(status=STATUS_FAILED, audit_seq=seq, completion_tokens=usage.get("completion_tokens", 0),
                       prompt_tokens=usage.get("prompt_tokens", 0), error={
                           "code": "output_not_kept", "message": "the request completed, but its output was "
                           "logged only as prompt_logging allows and cannot be served again"})
        return cls(status=STATUS_COMPLETED if kind == "completion" else kind, text=texts.get(served, ""),
                   finish_reason=body.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens", 0),
                   completion_tokens=usage.get("completion_tokens", 0), audit_seq=seq,
                   error=body.get("error", {}))

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "JobResult":
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def sealed(self, sealer: Sealer) -> dict[str, Any]:
        """The task's return value as stored in Redis: status in clear, the rest sealed."""
        return {"status": self.status, "sealed": sealer.seal_text(json.dumps(self.to_payload()).encode())}


def open_result(payload: dict[str, Any], sealer: Sealer) -> dict[str, Any]:
    """A task's return value as a :class:`JobResult` payload.

    An unsealed value (a worker that could not read its job: no key, or
    another key) is believed only as a failure without text, so nobody who
    can write to Redis can make the gateway serve text of their choosing.
    """
    if "sealed" not in payload:
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        return {"status": STATUS_FAILED, "error": {"code": str(error.get("code", "worker_error")),
                                                    "message": str(error.get("message", ""))}}
    try:
        return json.loads(sealer.unseal_text(payload["sealed"]))
    except (SealError, ValueError):
        return {"status": STATUS_FAILED, "error": {"code": "worker_error",
                                                    "message": "the worker's result could not be unsealed"}}


def seal_piece(sealer: Sealer, seq: int, text: str) -> str:
    """A stream piece as PUBLISHed: sealed, so pub/sub (and MONITOR) never carries text."""
    return sealer.seal_text(json.dumps({"seq": seq, "text": text}).encode())


def open_piece(sealer: Sealer, raw: bytes | str) -> str:
    """The text of a published piece; raises :class:`SealError` or ``ValueError`` if unreadable."""
    return json.loads(sealer.unseal_text(raw))["text"]
