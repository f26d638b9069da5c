"""The request path of a completion: validate, decide, record, queue, wait.

This is the service behind both OpenAI endpoints (DESIGN.md, "The request
path"). Its ordering is the product's promise:

* a request is recorded in the audit log (with its decision and the policy
  revision) *before* anything is queued, and is refused with 503 if that
  record cannot be written;
* a denied request is recorded too, and so is invalid input from a known
  principal;
* an accepted request ends in exactly one terminal entry — written by the
  worker (completion or failure) or, when the worker cannot be reached or
  took too long, by the gateway (failed or timed_out). The database's unique
  constraint on terminal entries settles any race between the two.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

import anyio
from redis.exceptions import RedisError

from audit import AuditEntry, AuditError, AuditStore, DuplicateTerminalError
from gateway.api.parsing import parse_body
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.auth import Principal
from gateway.dispatch import Dispatcher, QueueUnavailable, ResultTimeout, ResultWaiter
from gateway.errors import ApiError
from gateway.policy import Decision, PolicyEngine
from gateway.policy_input import build_input
from workers.contract import STATUS_COMPLETED, GenerateJob, JobResult
from workers.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

CHAT = "chat.completions"
COMPLETIONS = "completions"
_EXCERPT_BYTES = 2048


@dataclass(frozen=True)
class Admitted:
    """What the endpoint needs to shape its response."""

    request_id: str
    model: str
    created: int
    result: JobResult
    decision: Decision


class CompletionService:
    """Runs one request through policy, audit and the queue."""

    def __init__(self, *, registry: Registry, policy: PolicyEngine, audit: AuditStore,
                 dispatcher: Dispatcher, waiter: ResultWaiter, default_max_tokens: int,
                 request_timeout_s: float) -> None:
        self.registry = registry
        self.policy = policy
        self.audit = audit
        self.dispatcher = dispatcher
        self.waiter = waiter
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s

    async def handle(self, principal: Principal, endpoint: str, read_body: Callable[[], Awaitable[bytes]],
                     purpose_header: str | None) -> Admitted:
        request_id = uuid.uuid4().hex
        raw = b""
        try:
            raw = await read_body()
            kind = ChatCompletionRequest if endpoint == CHAT else CompletionRequest
            request = parse_body(raw, kind)
            spec = self.registry.get(request.model)
            if spec is None:
                raise ApiError(404, "model_not_found",
                               f"The model '{request.model}' does not exist. GET /v1/models lists the models "
                               "you may use.", param="model")
        except ApiError as error:
            await self._record_rejection(request_id, principal, endpoint, error, raw)
            raise
        return await self._admit(request_id, principal, endpoint, request, spec, purpose_header)

    async def _admit(self, request_id: str, principal: Principal, endpoint: str,
                     request: ChatCompletionRequest | CompletionRequest, spec: ModelSpec,
                     purpose_header: str | None) -> Admitted:
        created = int(time.time())
        requested_max = self._requested_max_tokens(request)
        purpose = purpose_header or (request.metadata or {}).get("purpose")
        messages = prompt = None
        if isinstance(request, ChatCompletionRequest):
            messages = [m.as_dict() for m in request.messages]
        else:
            prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        policy_input = build_input(principal=principal, endpoint=endpoint, model=spec,
                                   max_tokens=requested_max, stream=request.stream, purpose=purpose,
                                   messages=messages, prompt=prompt)
        decision = await self.policy.decide(policy_input)
        max_tokens = decision.obligations.get("max_tokens", requested_max) if decision.allow else requested_max
        params = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop_list(),
            "seed": request.seed,
        }
        body = {
            "endpoint": endpoint,
            "key_id": principal.key_id,
            "roles": list(principal.roles),
            "purpose": purpose,
            "params": params,
            "requested_max_tokens": requested_max,
            "decision": decision.to_document(),
            **_logged_prompt(messages, prompt, decision.obligations.get("prompt_logging", "full")),
        }
        await self._append("request", request_id, principal, spec.name, body, refuse_on_failure=True)
        if not decision.allow:
            raise _denial(decision)

        job = GenerateJob(request_id=request_id, model=spec.name, endpoint=endpoint, params=params,
                          principal=principal.id, team=principal.team, policy_revision=self.policy.revision,
                          messages=messages, prompt=prompt, enqueued_at_ns=time.time_ns())
        result = await self._run(job, principal)
        return Admitted(request_id=request_id, model=spec.name, created=created, result=result, decision=decision)

    def _requested_max_tokens(self, request: ChatCompletionRequest | CompletionRequest) -> int:
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
            return request.max_completion_tokens
        return request.max_tokens if request.max_tokens is not None else self.default_max_tokens

    async def _run(self, job: GenerateJob, principal: Principal) -> JobResult:
        """Queue the job and wait for it; every exit leaves one terminal entry."""
        try:
            async with self.waiter.expect(job.request_id) as pending:
                await self.dispatcher.enqueue(job)
                meta = await pending.get(self.request_timeout_s)
        except ResultTimeout:  # before OSError: TimeoutError is one
            winner = await self._end(job, principal, "timed_out",
                                     {"error": {"code": "timed_out",
                                                "message": f"no result within {self.request_timeout_s:g}s"}})
            if winner is not None and winner.kind == "completion":
                return JobResult.from_terminal(winner.kind, winner.seq, winner.body)
            raise ApiError(504, "timed_out",
                           f"The model did not answer within {self.request_timeout_s:g} seconds.") from None
        except (QueueUnavailable, RedisError, OSError) as exc:
            log.error("queue unavailable for %s: %s", job.request_id, exc)
            await self._end(job, principal, "failed", {"error": {"code": "queue_unavailable", "message": str(exc)}})
            raise ApiError(503, "queue_unavailable",
                           "The request queue is unavailable; nothing was generated. Try again shortly.") from None
        return await self._settle(job, principal, meta)

    async def _settle(self, job: GenerateJob, principal: Principal, meta: dict[str, Any]) -> JobResult:
        """Turn Celery's result meta into a result, or a designed error."""
        status = meta.get("status")
        if status == "SUCCESS" and isinstance(meta.get("result"), dict):
            result = JobResult.from_payload(meta["result"])
            if result.status == STATUS_COMPLETED:
                return result
            if result.audit_seq is None:  # the worker could not record its outcome
                await self._end(job, principal, "failed", {"error": result.error})
            raise _worker_error(result)
        if status == "REVOKED":  # expired in the queue before a worker took it
            await self._end(job, principal, "timed_out", {"error": {"code": "expired", "message": "expired in queue"}})
            raise ApiError(504, "timed_out", "The request expired in the queue before a worker could take it.")
        message = str(meta.get("result", {}).get("exc_message") if isinstance(meta.get("result"), dict) else "")
        await self._end(job, principal, "failed", {"error": {"code": "worker_error", "message": message}})
        raise ApiError(502, "worker_error", "The model worker failed on this request; it has been logged.")

    async def _end(self, job: GenerateJob, principal: Principal, kind: str, body: dict[str, Any]) -> AuditEntry | None:
        """Write a terminal entry unless one exists; return the entry that ended the request."""
        try:
            return await self._append(kind, job.request_id, principal, job.model, body)
        except DuplicateTerminalError:
            return await anyio.to_thread.run_sync(self.audit.terminal_for, job.request_id)
        except AuditError as exc:
            log.error("could not record %s for %s: %s", kind, job.request_id, exc)
            return None

    async def _append(self, kind: str, request_id: str, principal: Principal, model: str | None,
                      body: dict[str, Any], *, refuse_on_failure: bool = False) -> AuditEntry:
        append = partial(self.audit.append, kind, request_id, principal=principal.id, team=principal.team,
                         model=model, body=body, policy_revision=self.policy.revision)
        try:
            return await anyio.to_thread.run_sync(append)
        except DuplicateTerminalError:
            raise
        except AuditError as exc:
            if not refuse_on_failure:
                raise
            log.error("audit store unavailable, refusing %s: %s", request_id, exc)
            raise ApiError(503, "audit_unavailable",
                           "The audit log cannot be written, so the request was refused (nothing is served "
                           "unaudited). Try again shortly.") from None

    async def _record_rejection(self, request_id: str, principal: Principal, endpoint: str, error: ApiError,
                                raw: bytes) -> None:
        body = {
            "endpoint": endpoint,
            "key_id": principal.key_id,
            "status": error.status,
            "error": {"code": error.code, "message": error.message, "param": error.param},
            "body_bytes": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(),
            "body_excerpt": raw[:_EXCERPT_BYTES].decode("utf-8", errors="replace"),
        }
        try:
            await self._append("rejected", request_id, principal, None, body)
        except AuditError as exc:  # the client is refused anyway; say so in the logs
            log.error("could not record rejection %s: %s", request_id, exc)


def _logged_prompt(messages: list[dict[str, str]] | None, prompt: str | None, mode: str) -> dict[str, Any]:
    """The prompt as the ``prompt_logging`` obligation allows it to be stored.

    ``full`` stores it; ``hash`` (and, until content detectors exist,
    ``redacted``) stores only a SHA-256 of its canonical text.
    """
    content: dict[str, Any] = {"messages": messages} if messages is not None else {"prompt": prompt}
    if mode == "full":
        return {"prompt_logging": mode, **content}
    text = "\n".join(m["content"] for m in messages) if messages is not None else (prompt or "")
    return {"prompt_logging": mode, "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _denial(decision: Decision) -> ApiError:
    reasons = [r.to_document() for r in decision.reasons]
    summary = "; ".join(r.message for r in decision.reasons) or "denied by policy"
    return ApiError(403, "policy_denied", f"Denied by policy: {summary}", extra={"reasons": reasons})


def _worker_error(result: JobResult) -> ApiError:
    code = result.error.get("code", "worker_error")
    message = result.error.get("message", "")
    if code == "audit_unavailable":
        return ApiError(503, code, "The audit log cannot be written, so the output was withheld.")
    if code == "context_length_exceeded":
        return ApiError(400, code, f"The request does not fit the model's context: {message}", param="messages")
    if code == "generation_failed":
        return ApiError(502, code, f"The model could not generate: {message}")
    return ApiError(502, code, "The model worker failed on this request; it has been logged.")
