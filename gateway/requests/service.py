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

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from audit import AuditEntry, AuditError, AuditStore, DuplicateTerminalError
from gateway.auth import Principal
from gateway.dispatch import Dispatcher, QueueUnavailable, ResultTimeout, ResultWaiter
from gateway.errors import ApiError, errors_of
from gateway.limits import CountersUnavailable, Refusal, Reservation, UsageCounters
from gateway.limits.charge import prompt_tokens_to_hold, used_tokens
from gateway.policy import POLICY_ERROR, Decision
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.audit_records import decision_for_audit, logged_prompt, rejection_record
from gateway.requests.fit import PromptCounter, check_fits
from gateway.requests.parsing import parse_body
from gateway.requests.policy_input import build_input, prompt_text, without_prompt
from gateway.requests.refusals import admission_refusal, denial, worker_error
from gateway.requests.schemas import ChatCompletionRequest, CompletionRequest
from workers.contract.celery_config import queue_keys
from workers.contract.jobs import CANCEL_TTL_S, STATUS_COMPLETED, GenerateJob, JobResult, cancel_key, queue_for
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester, logged_output
from workers.contract.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

CHAT = "chat.completions"
COMPLETIONS = "completions"


@dataclass(frozen=True)
class Ticket:
    """An admitted request: recorded, allowed, ready to be queued."""

    request_id: str
    principal: Principal
    model: str
    created: int
    job: GenerateJob
    decision: Decision
    include_usage: bool = False
    #: Tokens held against the principal's and team's limits until the request ends.
    reservation: Reservation | None = None


def _unsent_text(delivered: str, result: JobResult) -> str:
    """The part of the audited output a stream has not delivered yet.

    Pieces travel on pub/sub and can be lost (a Redis reconnect) or still be
    unread when the result is found in its stored copy; the result holds the
    whole audited text, so the stream sends what is missing before it ends.
    If what was sent is not the start of that text, the stream cannot be made
    right and ends with an error event instead of a false success.
    """
    if result.text.startswith(delivered):
        return result.text[len(delivered):]
    log.error("streamed text of a request differs from its result (%d vs %d chars)", len(delivered),
              len(result.text))
    raise ApiError(502, "stream_inconsistent", "The streamed text does not match the recorded output; "
                   "discard what was received. The request has been logged.")


class CompletionService:
    """Runs one request through policy, audit and the queue."""

    def __init__(self, *, registry: Registry, policy: ReloadingPolicyEngine, audit: AuditStore,
                 dispatcher: Dispatcher, waiter: ResultWaiter, redis: aioredis.Redis, counters: UsageCounters,
                 default_max_tokens: int, request_timeout_s: float, max_queued_per_model: int,
                 digester: Digester, pending: PendingTerminals | None = None) -> None:
        self.registry = registry
        self.digester = digester
        self.counters = counters
        self.prompt_counter = PromptCounter()
        self.max_queued_per_model = max_queued_per_model
        self.policy = policy
        self.audit = audit
        self.dispatcher = dispatcher
        self.waiter = waiter
        self.redis = redis
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s
        self._background: set[asyncio.Task] = set()
        #: Terminal entries the database refused, written later (None: only logged).
        self.pending = pending

    async def admit(self, principal: Principal, endpoint: str, read_body: Callable[[], Awaitable[bytes]],
                    purpose_header: str | None) -> Ticket:
        """Validate, decide and record a request; raise :class:`ApiError` if it is not admitted."""
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
            check_fits(request, spec)
        except ApiError as error:
            await self._record_rejection(request_id, principal, endpoint, error, raw)
            error.request_id = request_id
            raise
        with errors_of(request_id):
            return await self._decide(request_id, principal, endpoint, request, spec, purpose_header)

    async def _decide(self, request_id: str, principal: Principal, endpoint: str,
                      request: ChatCompletionRequest | CompletionRequest, spec: ModelSpec,
                      purpose_header: str | None) -> Ticket:
        created = int(time.time())
        requested_max = self._requested_max_tokens(request)
        purpose = purpose_header or (request.metadata or {}).get("purpose")
        messages = prompt = None
        if isinstance(request, ChatCompletionRequest):
            messages = [m.as_dict() for m in request.messages]
        else:
            prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        try:
            usage = await self.counters.snapshot(principal.id, principal.team)
        except CountersUnavailable as exc:
            usage = None
            unavailable = exc
        policy_input = build_input(principal=principal, endpoint=endpoint, model=spec,
                                   max_tokens=requested_max, stream=request.stream, purpose=purpose,
                                   messages=messages, prompt=prompt, usage=usage)
        if usage is None:  # fail closed: no counters, no decision
            decision = Decision.fail_closed("usage_unavailable", f"usage counters are unavailable: {unavailable}")
            revision = self.policy.revision
        else:
            decision, revision = await self.policy.decide_with_revision(policy_input)
            if decision.allow and decision.obligations.max_tokens < 1:  # nothing could be generated
                decision = Decision.fail_closed(POLICY_ERROR, "the policy allowed the request with max_tokens 0")
        max_tokens = decision.obligations.get("max_tokens", requested_max) if decision.allow else requested_max
        params = request.sampling_params(max_tokens, spec.repetition_penalty)
        reservation, admission = None, None
        if decision.allow:
            reservation, admission = await self._admit(request_id, principal, spec, decision, max_tokens,
                                                       messages, prompt)
        body = {
            "endpoint": endpoint,
            "key_id": principal.key_id,
            "roles": list(principal.roles),
            "purpose": purpose,
            "stream": request.stream,
            "params": params.to_payload(),
            "requested_max_tokens": requested_max,
            "decision": decision_for_audit(decision, self.digester),
            "admission": admission,
            "policy_input": without_prompt(policy_input),
            **logged_prompt(messages, prompt, decision.obligations.get("prompt_logging", "full"),
                             decision.obligations.get("redact") or [], self.digester),
        }
        try:
            await self._append("request", request_id, principal, spec.name, body, revision, refuse_on_failure=True)
        except ApiError:
            if reservation is not None:
                await self._release(reservation)
            raise
        if usage is None:
            raise ApiError(503, "usage_unavailable",
                           "Usage limits cannot be checked right now (Redis is unavailable), so the request was "
                           "refused. Try again shortly.")
        if not decision.allow:
            raise denial(decision.reasons)
        if reservation is None:
            raise admission_refusal(admission)
        job = GenerateJob(request_id=request_id, model=spec.name, endpoint=endpoint, params=params,
                          principal=principal.id, team=principal.team, policy_revision=revision,
                          messages=messages, prompt=prompt, stream=request.stream,
                          prompt_logging=decision.obligations.get("prompt_logging", "full"),
                          redact=list(decision.obligations.get("redact") or []))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Ticket(request_id=request_id, principal=principal, model=spec.name, created=created, job=job,
                      decision=decision, include_usage=include_usage, reservation=reservation)

    async def _admit(self, request_id: str, principal: Principal, spec: ModelSpec, decision: Decision,
                     max_tokens: int, messages: list[dict[str, str]] | None,
                     prompt: str | None) -> tuple[Reservation | None, dict[str, Any]]:
        """Check the prompt fits, reserve the request's tokens against its limits, then check the queue.

        The policy judged a snapshot of the counters; the reservation is the
        atomic check that enforces the same limits however many requests race.
        """
        prompt_tokens = await self.prompt_counter.count(spec, messages, prompt)  # text checked by check_fits
        if prompt_tokens is not None and prompt_tokens + max_tokens > spec.context_length:
            return None, {"admitted": False, "code": "context_length_exceeded", "prompt_tokens": prompt_tokens,
                          "max_tokens": max_tokens, "context_length": spec.context_length}
        limits = decision.obligations.get("limits") or {"principal": {}, "team": None}
        held_prompt = prompt_tokens_to_hold(prompt_tokens, prompt_text(messages, prompt))
        reserved = held_prompt + max_tokens  # budgets count prompt and completion tokens
        try:
            outcome = await self.counters.reserve(request_id, principal.id, principal.team, limits, reserved)
        except CountersUnavailable as exc:
            return None, {"admitted": False, "code": "usage_unavailable", "message": str(exc)}
        if isinstance(outcome, Refusal):
            return None, {"admitted": False, "code": outcome.code, "refusal": outcome.to_dict()}
        try:
            waiting = await self.queue_depth(spec.name)
        except (RedisError, OSError) as exc:
            await self._release(outcome)
            return None, {"admitted": False, "code": "queue_unavailable", "message": str(exc)}
        if waiting >= self.max_queued_per_model:
            await self._release(outcome)
            return None, {"admitted": False, "code": "queue_full", "waiting": waiting,
                          "limit": self.max_queued_per_model}
        return outcome, {"admitted": True, "reserved_tokens": reserved, "prompt_tokens": prompt_tokens,
                         "waiting": waiting}

    async def queue_depth(self, model: str) -> int:
        """Requests waiting in a model's queue (all priorities)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in queue_keys(queue_for(model)):
                pipe.llen(key)
            return sum(await pipe.execute())

    async def _account(self, ticket: Ticket, tokens: int | None) -> None:
        """Reconcile the reservation: the real token count, or nothing generated."""
        if ticket.reservation is None:
            return
        if not tokens:
            await self._release(ticket.reservation)
            return
        try:
            await self.counters.settle(ticket.reservation, tokens)
        except CountersUnavailable as exc:  # held tokens expire with their day; in-flight with its TTL
            log.error("could not reconcile usage of %s: %s", ticket.request_id, exc)

    async def _release(self, reservation: Reservation) -> None:
        try:
            await self.counters.release(reservation)
        except CountersUnavailable as exc:
            log.error("could not release reservation of %s: %s", reservation.request_id, exc)

    async def complete(self, ticket: Ticket) -> JobResult:
        """Queue the job and wait for its result; every exit leaves one terminal entry."""
        job = ticket.job
        try:
            async with self.waiter.expect(job.request_id) as pending:
                await self._enqueue(ticket)
                meta = await pending.get(self.request_timeout_s)
        except ResultTimeout:  # before OSError: TimeoutError is one
            return await self._timed_out(ticket)
        except (QueueUnavailable, RedisError, OSError) as exc:
            raise await self._queue_down(ticket, exc) from None
        return await self._settle(ticket, meta)

    @contextlib.asynccontextmanager
    async def stream(self, ticket: Ticket) -> AsyncIterator[AsyncIterator[str | JobResult]]:
        """Queue a streaming job; yields an iterator of text pieces ending with the result.

        Entering queues the job (errors here are ordinary HTTP errors, before
        any byte is sent). If the consumer stops early (the client went away),
        leaving the block cancels the generation and makes sure the request
        still gets its terminal entry.
        """
        job = ticket.job
        finished = False
        async with contextlib.AsyncExitStack() as stack:
            try:
                pending = await stack.enter_async_context(self.waiter.expect(job.request_id, stream=True))
                await self._enqueue(ticket)
            except (QueueUnavailable, RedisError, OSError) as exc:
                raise await self._queue_down(ticket, exc) from None

            async def events() -> AsyncIterator[str | JobResult]:
                nonlocal finished
                delivered: list[str] = []
                try:
                    async with contextlib.aclosing(pending.events(self.request_timeout_s)) as incoming:
                        async for event in incoming:
                            if isinstance(event, str):
                                delivered.append(event)
                                yield event
                            else:
                                finished = True
                                result = await self._settle(ticket, event)
                                break
                        else:  # pragma: no cover - events() always ends with the result or raises
                            return
                except ResultTimeout:  # the audit keeps what the client already received
                    finished = True
                    result = await self._timed_out(ticket, output="".join(delivered))
                except (RedisError, OSError) as exc:
                    finished = True
                    raise await self._queue_down(ticket, exc) from None
                missing = _unsent_text("".join(delivered), result)
                if missing:
                    yield missing
                yield result

            try:
                yield events()
            finally:
                if not finished:
                    self._abandon(ticket)

    async def _enqueue(self, ticket: Ticket) -> None:
        job = replace(ticket.job, enqueued_at_ns=time.time_ns())
        await self.dispatcher.enqueue(job, priority=ticket.decision.obligations.get("priority"))

    async def _timed_out(self, ticket: Ticket, *, output: str | None = None) -> JobResult:
        """The wait ran out: stop the worker, end the request (unless it just ended), 504.

        ``output`` is what a stream already sent to its client.
        """
        job = ticket.job
        await self._request_cancel(job.request_id)
        body: dict[str, Any] = {"error": {"code": "timed_out",
                                          "message": f"no result within {self.request_timeout_s:g}s"}}
        if output is not None:  # kept as the request's prompt_logging allows, like a worker's output
            body.update(logged_output(output, job.prompt_logging, job.redact, self.digester))
        winner = await self._end(ticket, "timed_out", body)
        if winner is not None and winner.kind == "completion":
            result = JobResult.from_terminal(winner.kind, winner.seq, winner.body)
            await self._account(ticket, result.prompt_tokens + result.completion_tokens)
            if result.status != STATUS_COMPLETED:  # its output was logged only as a digest or masked
                raise worker_error(result)
            return result
        await self._account(ticket, None)
        raise ApiError(504, "timed_out", f"The model did not answer within {self.request_timeout_s:g} seconds.")

    async def _queue_down(self, ticket: Ticket, exc: BaseException) -> ApiError:
        log.error("queue unavailable for %s: %s", ticket.request_id, exc)
        await self._account(ticket, None)
        await self._end(ticket, "failed", {"error": {"code": "queue_unavailable", "message": str(exc)}})
        return ApiError(503, "queue_unavailable",
                        "The request queue is unavailable; nothing was generated. Try again shortly.")

    def _abandon(self, ticket: Ticket) -> None:
        """The client left mid-stream: cancel the generation and see the request ended."""
        task = asyncio.get_running_loop().create_task(self._cancel_and_close(ticket))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_and_close(self, ticket: Ticket) -> None:
        """Ask the worker to stop; if no worker ever ends the request, end it here.

        A worker that picks the job up (or is running it) sees the cancel key,
        stops, and records ``cancelled`` with the partial output. If the job
        never reaches a worker before it expires, nobody else would record an
        end, so after the queue's expiry the gateway records ``cancelled``.
        """
        request_id = ticket.request_id
        await self._request_cancel(request_id)
        try:  # the worker (or Celery, for an expired job) publishes a result once the request has ended
            async with self.waiter.expect(request_id) as pending:
                await pending.get(self.request_timeout_s + 5)
        except (ResultTimeout, RedisError, OSError):
            pass
        entry = await anyio.to_thread.run_sync(self.audit.terminal_for, request_id)
        if entry is None:  # no worker took it: end it here
            await self._end(ticket, "cancelled", {"output": "", "error": {
                "code": "cancelled", "message": "the client went away before a worker took the request"}})
            await self._account(ticket, None)
            return
        await self._account(ticket, used_tokens(entry.body.get("usage")))

    async def _request_cancel(self, request_id: str) -> None:
        try:
            await self.redis.set(cancel_key(request_id), b"1", ex=CANCEL_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("cannot flag %s as cancelled: %s", request_id, exc)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()

    def _requested_max_tokens(self, request: ChatCompletionRequest | CompletionRequest) -> int:
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
            return request.max_completion_tokens
        return request.max_tokens if request.max_tokens is not None else self.default_max_tokens

    async def _settle(self, ticket: Ticket, meta: dict[str, Any]) -> JobResult:
        """Turn Celery's result meta into a result, or a designed error."""
        status = meta.get("status")
        if status == "SUCCESS" and isinstance(meta.get("result"), dict):
            result = JobResult.from_payload(meta["result"])
            await self._account(ticket, result.prompt_tokens + result.completion_tokens)
            if result.status == STATUS_COMPLETED:
                return result
            if result.audit_seq is None:  # the worker could not record its outcome
                await self._end(ticket, "failed", {"error": result.error})
            raise worker_error(result)
        await self._account(ticket, None)
        if status == "REVOKED":  # expired in the queue before a worker took it
            await self._end(ticket, "timed_out", {"error": {"code": "expired", "message": "expired in queue"}})
            raise ApiError(504, "timed_out", "The request expired in the queue before a worker could take it.")
        message = str(meta.get("result", {}).get("exc_message") if isinstance(meta.get("result"), dict) else "")
        await self._end(ticket, "failed", {"error": {"code": "worker_error", "message": message}})
        raise ApiError(502, "worker_error", "The model worker failed on this request; it has been logged.")

    async def _end(self, ticket: Ticket, kind: str, body: dict[str, Any]) -> AuditEntry | None:
        """Write a terminal entry unless one exists; return the entry that ended the request.

        An entry a worker could not write comes first (it holds the output);
        an entry the database refuses is kept pending and written later.
        """
        try:
            if self.pending is not None:
                earlier = await anyio.to_thread.run_sync(self.pending.write_one, self.audit, ticket.request_id)
                if earlier is not None:
                    return earlier
            return await self._append(kind, ticket.request_id, ticket.principal, ticket.model, body,
                                      ticket.job.policy_revision)
        except DuplicateTerminalError:
            return await anyio.to_thread.run_sync(self.audit.terminal_for, ticket.request_id)
        except AuditError as exc:
            log.error("could not record %s for %s: %s", kind, ticket.request_id, exc)
            if self.pending is not None:
                entry = PendingTerminal(kind=kind, request_id=ticket.request_id, principal=ticket.principal.id,
                                        team=ticket.principal.team, model=ticket.model, body=body,
                                        policy_revision=ticket.job.policy_revision)
                await anyio.to_thread.run_sync(self.pending.keep, entry)
            return None

    async def _append(self, kind: str, request_id: str, principal: Principal, model: str | None,
                      body: dict[str, Any], revision: str | None = None, *,
                      refuse_on_failure: bool = False) -> AuditEntry:
        append = partial(self.audit.append, kind, request_id, principal=principal.id, team=principal.team,
                         model=model, body=body, policy_revision=revision or self.policy.revision)
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
        body = rejection_record(endpoint, principal.key_id, error, raw, self.digester)
        try:
            await self._append("rejected", request_id, principal, None, body)
        except AuditError as exc:  # the client is refused anyway; say so in the logs
            log.error("could not record rejection %s: %s", request_id, exc)
