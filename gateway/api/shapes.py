"""Response shapes, as msgspec structs: what the API description promises.

The controllers build these bodies as plain dicts (the stream chunk by chunk);
the structs let ``/schema/openapi.json`` describe them exactly, and
``tests/e2e/test_openapi.py`` holds a served gateway to them with schemathesis
(completion shapes are closed: a field sent but not declared here fails it;
errors, the model list and health stay open). Class docstrings become the
schemas' descriptions, so they are Markdown.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

FinishReason = Literal["stop", "length"]


class _Closed(msgspec.Struct, forbid_unknown_fields=True):
    """A shape with exactly these fields (``additionalProperties: false`` in the description)."""


class Usage(_Closed):
    """Token counts from the model's own tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Closed):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletion(_Closed):
    """The body of a non-streamed `POST /v1/chat/completions`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Closed):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None


class TextCompletion(_Closed):
    """The body of a non-streamed `POST /v1/completions`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ChunkDelta(_Closed):
    """What a chat chunk adds: the role once, then pieces of content (the last delta is empty)."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(_Closed):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(_Closed):
    """One streamed chat event; the last (with `include_usage`) has no choices and a `usage`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | UnsetType = UNSET


class TextChunkChoice(_Closed):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class TextCompletionChunk(_Closed):
    """One streamed text-completion event (OpenAI reuses the `text_completion` object name)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | UnsetType = UNSET


class ErrorReason(msgspec.Struct):
    """One reason for a policy denial or a limit (see README, "Reason codes")."""

    code: str
    message: str
    retry_after_s: float | UnsetType = UNSET


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: str | None
    reasons: list[ErrorReason] | UnsetType = UNSET


class ErrorResponse(msgspec.Struct):
    """Every refusal, in OpenAI's shape; `code` is stable, `message` is for people."""

    error: ErrorDetail


class TeamQueue(msgspec.Struct):
    """One team's jobs waiting for the model, and its fraction of the waiting teams' weight."""

    waiting: int
    share: float


class QueueInfo(msgspec.Struct):
    """The model's queue. `waiting`: jobs waiting in all; `limit`: `GOVGATE_MAX_QUEUED_PER_MODEL`. In fair
    mode (`GOVGATE_QUEUE_MODE=fair`) an admin also gets `teams` (each waiting team's count and share); any
    other key gets only its own team's view: `your_team_waiting`, `position` (where a request sent now would
    be served, 1 = next) and `estimated_wait_s` (position × mean service time / live workers)."""

    waiting: int
    limit: int
    teams: dict[str, TeamQueue] | UnsetType = UNSET
    your_team_waiting: int | UnsetType = UNSET
    position: int | UnsetType = UNSET
    estimated_wait_s: float | UnsetType = UNSET


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    family: str
    context_length: int
    tags: list[str]
    #: null when Redis cannot be read: the list still answers.
    queue: QueueInfo | None


class ModelList(msgspec.Struct):
    """`GET /v1/models`: the models this key may use."""

    object: Literal["list"]
    data: list[Model]


class Health(msgspec.Struct):
    """`GET /healthz`: the process is up and serving (always `ok`; nothing else is checked)."""

    status: Literal["ok"]


class ReadinessChecks(msgspec.Struct):
    """Each dependency: `ok` or `error: <why>`."""

    database: str
    redis: str
    policy: str
    workers: str


class Readiness(msgspec.Struct):
    """`GET /readyz`: `ready` (200) or `unavailable` (503), with each check and what is missing."""

    status: Literal["ready", "unavailable"]
    checks: ReadinessChecks
    #: What keeps the gateway from serving: `database`, `redis`, `policy`, `workers:<model>` (`workers` without
    #: an admin key or GOVGATE_METRICS_TOKEN, which alone see model names).
    missing: list[str]
    #: Live workers per model (empty when Redis could not be read, or without an admin key or the token).
    workers: dict[str, int]
    policy_revision: str | None
    #: The registry's models (empty without an admin key or the token).
    models: list[str]
