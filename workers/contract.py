"""What the gateway and the workers agree on: the task name, its payload, its result.

The gateway imports this module (and only this, plus the registry) from
``workers``: it sends tasks by name, so it never imports the model code.
Payloads are plain JSON dicts because Celery serialises them as JSON; the
dataclasses here give both sides one definition of the fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: Celery task name of a generation.
GENERATE_TASK = "govgate.generate"

#: Result statuses a task can return (failures are results, not exceptions,
#: so the gateway can map them to designed HTTP errors).
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_TIMED_OUT = "timed_out"
STATUS_CANCELLED = "cancelled"

#: Prefix of the pub/sub channel a streaming job publishes its text pieces on.
STREAM_CHANNEL_PREFIX = "govgate:stream:"
#: Prefix of the key that asks a job to stop (client gone, or the gateway gave up).
CANCEL_KEY_PREFIX = "govgate:cancel:"
#: How long a cancel request is kept: longer than any job can wait in a queue.
CANCEL_TTL_S = 24 * 3600
#: Prefix of the key a worker's pool process sets once its model is loaded (``govgate up`` waits for it).
LOADED_KEY_PREFIX = "govgate:loaded:"
LOADED_TTL_S = 24 * 3600


def queue_for(model: str) -> str:
    """The Celery queue that carries one model's requests."""
    return f"model.{model}"


def stream_channel(request_id: str) -> str:
    return STREAM_CHANNEL_PREFIX + request_id


def cancel_key(request_id: str) -> str:
    return CANCEL_KEY_PREFIX + request_id


def loaded_key(model: str, worker_pid: int) -> str:
    """Set when a pool process of the worker whose main process is ``worker_pid`` has loaded ``model``."""
    return f"{LOADED_KEY_PREFIX}{model}:{worker_pid}"


def celery_redis_url(redis_url: str) -> str:
    """Turn a redis-py URL into the form Celery's broker and backend accept.

    redis-py spells a unix socket ``unix:///path?db=N``; kombu and Celery's
    result backend want ``redis+socket:///path?virtual_host=N``. TCP URLs are
    the same for both.
    """
    parts = urlsplit(redis_url)
    if parts.scheme != "unix":
        return redis_url
    db = parse_qs(parts.query).get("db", ["0"])[0]
    return f"redis+socket://{parts.path}?virtual_host={db}"


@dataclass(frozen=True)
class GenerateJob:
    """One admitted request, as queued for a worker."""

    request_id: str
    model: str
    endpoint: str  # "chat.completions" | "completions"
    params: dict[str, Any]  # max_tokens (after obligations), temperature, top_p, stop, seed
    principal: str
    team: str | None
    policy_revision: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    enqueued_at_ns: int = 0
    #: Publish text pieces on :func:`stream_channel` as they are generated.
    stream: bool = False

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "GenerateJob":
        return cls(**payload)


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

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_terminal(cls, kind: str, seq: int, body: dict[str, Any]) -> "JobResult":
        """The result a request's terminal audit entry stands for.

        Used when a request already ended (a redelivered task, or a late
        worker racing the gateway's timeout): the log is the source of truth.
        """
        usage = body.get("usage", {})
        return cls(status=STATUS_COMPLETED if kind == "completion" else kind, text=body.get("output", ""),
                   finish_reason=body.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens", 0),
                   completion_tokens=usage.get("completion_tokens", 0), audit_seq=seq,
                   error=body.get("error", {}))

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "JobResult":
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        return cls(**known)
