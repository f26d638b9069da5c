"""Everything before the queue: read, fit, decide, reserve, record; the result is a ticket or a refusal.

The request entry (with its decision and policy revision) is written before
anything is queued, for denied and refused requests too; a body refused
before any decision is recorded as ``rejected``.

Usage costs one Redis call in the common case: the call that reads the
snapshot for the policy also reserves, ahead of the decision, against the
``limits`` the policy obliged last time for this principal, team and model,
and checks the model's queue. The reservation stands only if the decision
then obliges exactly those limits and grants the tokens reserved; otherwise
it is replaced (one more call) or undone. docs/architecture.md, "Usage
counters", says why this is as sound as reserving after the decision.

The early reservation is checked against the model's queue but takes no
place in it (``UsageCounters.admit``'s ``place``): a request the policy
then denies must not keep a place from one it allows (probe p2 #1: a flood
of 403s from a key with a remembered allow kept the places busy, and other
teams' valid requests got 429 ``queue_full``). The place is taken after
the decision instead, with no call of its own: the ticket carries the
queue check (``Ticket.place_check``) and the push makes it in the step that
queues the job, refusing ``queue_full`` there if the queue filled meanwhile
(``TicketRunner.no_place``). The push is the only Redis call between the
decision and the queue (the audit entry goes to the database), so taking
the place anywhere else after the decision would cost every allowed request
a round trip. A reservation made after the decision (the first request, a
replacement) takes its place at once, as before.

A reserving call that fails without an answer (a timeout, a lost
connection) refuses the request (503 ``usage_unavailable``), and the
counters give back in the background whatever its script took or will take
once Redis runs it (``UsageCounters.admit``): a refused request holds
nothing, and its answer does not wait for Redis.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from gateway.auth import Principal
from gateway.api_errors import ApiError, errors_of
from gateway.dispatch.model_health import ModelHealth
from gateway.drain import Cut, Drain, shutting_down
from gateway.limits import (CountersReply, CountersUnavailable, QueueAtLimit, QueueCheck, Refusal, Reservation,
                            Scope, UsageCounters)
from gateway.limits.catalogue import LIMIT_CODES, TOO_MANY_IN_FLIGHT
from gateway.limits.in_flight_wait import in_flight_wait_s
from gateway.limits.queue import fair_model_queue, model_queue
from gateway.limits.charge import prompt_tokens_to_hold
from gateway.observability.context import current_request_id, note_model
from gateway.observability.metrics import timed_decision
from gateway.policy import Decision
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.admission_gate import AdmissionGate
from gateway.requests.audit_records import request_record
from gateway.requests.decision_checks import checked_decision
from gateway.requests.fit import PromptCounter, check_fits
from gateway.requests.hidden_models import (SeenModels, answered_record, as_answered,
                                            model_not_found)
from gateway.requests.kept_reservation import refuse_if_given_back
from gateway.requests.minute_wait import needs_minute_wait, with_minute_wait
from gateway.requests.parsing import parse_body
from gateway.requests.policy_input import build_input, prompt_text, without_prompt
from gateway.requests.purpose import declared_purpose
from gateway.requests.refusals import (AdmissionRefusal, ContextTooLong, ModelUnavailable, OverLimit, QueueFull,
                                       UsageUnavailable, alone_over_a_limit, denial)
from gateway.requests.request_log import RequestLog
from gateway.requests.schemas import REQUEST_SHAPES, ChatCompletionRequest, CompletionRequest
from gateway.requests.ticket import Ticket
from gateway.requests.usage import release_reservation, undo_reservation
from workers.contract.fair_queues import MODE_FAIR, MODE_FIFO, QUEUE_MODES
from workers.contract.jobs import GenerateJob
from workers.contract.privacy import Digester
from workers.contract.registry import ModelSpec, Registry
from workers.contract.sampling import SamplingParams

#: The limits reserved against when the policy gives none (a policy older than the ``limits`` obligation).
NO_LIMITS: dict[str, Any] = {"principal": {}, "team": None}

Request = ChatCompletionRequest | CompletionRequest

#: Principal, team and model whose last allowed decision's obligations are remembered (bounded, oldest dropped).
_GUESSES_KEPT = 4096


@dataclass(frozen=True)
class Obliged:
    """What the last allowed decision for a principal, team and model obliged: the next one's likely terms."""

    limits: dict[str, Any]
    priority: int | None
    #: The ``max_tokens`` a request asking for more is clamped to, as a decision that clamped showed it (None:
    #: none did yet). The early reservation holds the clamped tokens: one for the requested ones was
    #: refused, or held too much, and was made again for every such request (probe p2 #4).
    max_tokens_cap: int | None = None

    def completion_tokens(self, requested_max: int) -> int:
        """The ``max_tokens`` the decision will likely grant a request asking for ``requested_max``."""
        return requested_max if self.max_tokens_cap is None else min(requested_max, self.max_tokens_cap)


def granted_cap(granted: int, requested_max: int, last: Obliged | None) -> int | None:
    """The clamp a decision that granted ``granted`` of ``requested_max`` shows: ``granted`` when it clamped;
    else the one seen before while it still agrees (it is at least ``granted``); else unknown."""
    if granted < requested_max:
        return granted
    if last is not None and last.max_tokens_cap is not None and last.max_tokens_cap >= granted:
        return last.max_tokens_cap
    return None


@dataclass(frozen=True)
class Admitted:
    """An allowed request that fits its model, holds its tokens and has room in its queue."""

    reservation: Reservation
    #: Prompt and completion tokens held against the limits.
    reserved_tokens: int
    #: The prompt's exact token count (None when the gateway cannot read the model's tokenizer).
    prompt_tokens: int | None
    #: Requests already waiting in the model's queue.
    waiting: int
    #: The completion's bound as held: the decided one, or less when the client gave none and the
    #: default would not fit beside the prompt (the rest of the context, as OpenAI's API runs).
    max_tokens: int
    #: The queue check its push makes (the early reservation took no place), or None (it holds its place).
    place_check: QueueCheck | None = None

    def record(self) -> dict[str, Any]:
        return {"admitted": True, "reserved_tokens": self.reserved_tokens, "prompt_tokens": self.prompt_tokens,
                "waiting": self.waiting}


@dataclass(frozen=True)
class Verdict:
    """What the policy decided about a request, and the input it decided on."""

    decision: Decision
    revision: str
    policy_input: dict[str, Any]
    #: Set when the usage counters could not be read: refused whatever the decision.
    counters_down: UsageUnavailable | None = None
    #: The reservation tried with the snapshot, ahead of the decision (None: none was tried).
    early: "EarlyReservation | None" = None


@dataclass(frozen=True)
class EarlyReservation:
    """What the snapshot's call reserved (or refused) before the policy decided, and under what."""

    limits: dict[str, Any]
    tokens: int
    prompt_tokens: int | None
    reply: CountersReply

    @property
    def reservation(self) -> Reservation | None:
        return self.reply.outcome if isinstance(self.reply.outcome, Reservation) else None


class Admission:
    """Turns a request body into a :class:`Ticket`, or raises the designed :class:`ApiError`."""

    def __init__(self, *, registry: Registry, policy: ReloadingPolicyEngine, counters: UsageCounters,
                 request_log: RequestLog, redis: aioredis.Redis, digester: Digester, default_max_tokens: int,
                 max_queued_per_model: int, queue_mode: str = MODE_FIFO, concurrency: int = 0,
                 gate_wait_s: float = 5.0, model_health: ModelHealth | None = None,
                 request_timeout_s: float = 120.0, lost_after_s: float | None = None) -> None:
        """``concurrency`` > 0: at most that many admissions at once, the others lined up by team share
        (:class:`AdmissionGate`, waiting at most ``gate_wait_s``). ``lost_after_s``: how long after its
        request entry an admitted request without an end counts as lost, written in the entry's
        ``admission`` for every gateway's sweep (``gateway/requests/lost_requests.py``)."""
        self.registry = registry
        self.policy = policy
        self.counters = counters
        self.request_log = request_log
        self.redis = redis  # the queue depth is read by the counters' script now; kept for callers that pass it
        self.digester = digester
        self.default_max_tokens = default_max_tokens
        self.max_queued_per_model = max_queued_per_model
        #: How long a request may wait for its result: bounds the ``too_many_in_flight`` 429's Retry-After.
        self.request_timeout_s = request_timeout_s
        self.lost_after_s = lost_after_s
        if queue_mode not in QUEUE_MODES:
            raise ValueError(f"queue_mode must be one of {QUEUE_MODES}, not {queue_mode!r}")
        #: fair: a team may hold its share of the model's places (gateway/limits/fair_share.py); fifo: the total.
        self.queue_mode = queue_mode
        self.prompt_counter = PromptCounter()
        #: Models that cannot be served now (no live worker, and a failed load): refused at once.
        self.model_health = model_health
        #: (principal, team, model) → what its last allowed decision obliged.
        self._obliged: dict[tuple[str, str | None, str], Obliged] = {}
        weight_of = getattr(policy, "team_weight", None)
        self.gate = AdmissionGate(concurrency, gate_wait_s, weight_of) if concurrency > 0 else None
        #: Whether a key may see a model, per policy revision: a refusal of a model it may not see is answered
        #: as an unknown model's (gateway/requests/hidden_models.py).
        self.seen_models = SeenModels(policy)

    def _admission_record(self, admission: Any) -> dict[str, Any] | None:
        """The request entry's ``admission``: an admitted one's also holds this gateway's wait before a sweep
        may end the request as lost, which another gateway's sweep (its own wait maybe shorter) reads
        (``gateway/requests/lost_requests.py``; probe s57 D1)."""
        if admission is None:
            return None
        record = admission.record()
        if isinstance(admission, Admitted) and self.lost_after_s is not None:
            record["lost_after_s"] = self.lost_after_s
        return record

    async def admit(self, principal: Principal, endpoint: str, read_body: Callable[[], Awaitable[bytes]],
                    purpose_headers: Sequence[str] = (), *, stopping: Drain | None = None) -> Ticket:
        """Read, decide, reserve and record one request; raise :class:`ApiError` if it is not admitted.

        ``purpose_headers``: every ``X-Govgate-Purpose`` value sent (``gateway/requests/purpose.py``).

        The body is read before a place at the gate is taken: a client that
        sends its headers and then its body slowly, or never, holds only its
        own connection (sixteen such uploads held every place, and every other
        team's request waited the gate's whole ``wait_s`` behind them).

        ``stopping``: once that drain has begun (its gateway is stopping) the request is refused 503
        ``shutting_down``, recorded ``rejected`` like a body refused before any decision."""
        request_id = current_request_id() or uuid.uuid4().hex  # the id the response header and logs name
        raw = await self._read_bytes(request_id, principal, endpoint, read_body)
        if stopping is not None and stopping.draining:
            refusal = shutting_down(in_flight=False)
            await self.request_log.record_rejection(request_id, principal, endpoint, refusal, raw)
            refusal.request_id = request_id
            raise refusal
        try:
            gate = self.gate
            if gate is None:
                return await self._admit(request_id, principal, endpoint, raw, purpose_headers, stopping)
            held = await gate.enter(principal.team)
            try:
                return await self._admit(request_id, principal, endpoint, raw, purpose_headers, stopping)
            finally:
                if held:
                    gate.leave()
        except Cut:  # the drain's cut came while its decision was awaited: not admitted, nothing reserved
            refusal = shutting_down(in_flight=False)
            await self.request_log.record_rejection(request_id, principal, endpoint, refusal, raw)
            refusal.request_id = request_id
            raise refusal from None

    async def _admit(self, request_id: str, principal: Principal, endpoint: str, raw: bytes,
                     purpose_headers: Sequence[str], stopping: Drain | None = None) -> Ticket:
        request, spec, purpose = await self._read(request_id, principal, endpoint, raw, purpose_headers, stopping)
        with errors_of(request_id):
            created = int(time.time())
            requested_max = request.requested_max_tokens(self.default_max_tokens)
            messages, prompt = request.prompt_parts()
            verdict = await self._decide(request_id, principal, endpoint, request, spec, purpose, requested_max,
                                         messages, prompt, stopping)
            decision = verdict.decision
            if not decision.allow and any(r.code == TOO_MANY_IN_FLIGHT for r in decision.reasons):
                decision = await self._in_flight_estimate(principal, spec, decision, verdict.policy_input)
            early_undone = False
            if needs_minute_wait(decision) and verdict.counters_down is None:
                if verdict.early is not None and verdict.early.reservation is not None:
                    # before the counters are asked for this request's wait: its own hold is no part of it
                    await undo_reservation(self.counters, verdict.early.reservation)
                    early_undone = True
                decision = await self._minute_estimate(request_id, principal, spec, decision, verdict,
                                                       requested_max, messages, prompt)
            params = request.sampling_params(decision.obligations.max_tokens if decision.allow else requested_max,
                                             spec.repetition_penalty)
            if decision.allow and verdict.counters_down is None:
                admission = await self._reserve(request_id, principal, spec, decision, params, messages, prompt,
                                                verdict.early, defaulted=not request.max_tokens_given,
                                                requested_max=requested_max)
                if isinstance(admission, Admitted) and admission.max_tokens != params.max_tokens:
                    params = dataclasses.replace(params, max_tokens=admission.max_tokens)
            else:
                admission = None
                if verdict.early is not None and verdict.early.reservation is not None and not early_undone:
                    await undo_reservation(self.counters, verdict.early.reservation)
            if verdict.counters_down is not None:
                refusal: ApiError | None = verdict.counters_down.error()
            elif not decision.allow:
                never, too_long = await self._never_passes(spec, decision, verdict, request, requested_max,
                                                           messages, prompt)
                if too_long is not None:  # the permanent refusal, not a 429 that would end in it (probe s59 H3)
                    admission, refusal = too_long, too_long.error()
                else:
                    refusal = denial(decision.reasons, never=never)
            elif not isinstance(admission, Admitted):
                assert admission is not None  # an allowed request is always checked
                refusal = admission.error()
            else:
                refusal = None
            # a model the key may not see is refused as an unknown one (gateway/requests/hidden_models.py)
            answer = None
            if refusal is not None:
                answer = await self._answered(principal, spec, request.model, refusal, stopping)
            body = request_record(endpoint=endpoint, principal=principal, purpose=purpose, stream=request.stream,
                                  params=params, requested_max_tokens=requested_max, decision=decision,
                                  admission=self._admission_record(admission),
                                  policy_input=verdict.policy_input, messages=messages, prompt=prompt,
                                  digester=self.digester)
            if refusal is not None and answer is not None and answer is not refusal:
                body["answered"] = answered_record(refusal, answer, raw, self.digester)
            try:
                await self.request_log.record_request(request_id, principal, spec.name, body, verdict.revision)
            except ApiError:  # refused unaudited: give back what it held
                if isinstance(admission, Admitted):
                    await release_reservation(self.counters, admission.reservation)
                raise  # a model the key may not see too: an unknown model's refusal is a 503 then as well
            if answer is not None:
                raise answer
            assert isinstance(admission, Admitted)
            job = GenerateJob(request_id=request_id, model=spec.name, endpoint=endpoint, params=params,
                              principal=principal.id, team=principal.team, policy_revision=verdict.revision,
                              messages=messages, prompt=prompt, stream=request.stream,
                              prompt_logging=decision.obligations.prompt_logging,
                              redact=[item.to_document() for item in decision.obligations.redact or ()])
            ticket = Ticket(request_id=request_id, principal=principal, model=spec.name, created=created, job=job,
                            priority=decision.obligations.priority, include_usage=request.include_usage,
                            reservation=admission.reservation, policy_input=without_prompt(verdict.policy_input),
                            decision=decision, place_check=admission.place_check)
            # an admission slow enough that another gateway may have taken its reservation for stale
            await refuse_if_given_back(self.counters, self.request_log, ticket)
            return ticket

    async def _read_bytes(self, request_id: str, principal: Principal, endpoint: str,
                          read_body: Callable[[], Awaitable[bytes]]) -> bytes:
        """The body's bytes; one refused as it arrives (too large, compressed, its client gone before its
        end) is recorded as ``rejected``."""
        try:
            return await read_body()
        except ApiError as error:
            await self.request_log.record_rejection(request_id, principal, endpoint, error, b"")
            error.request_id = request_id
            raise

    async def _answered(self, principal: Principal, spec: ModelSpec, asked: str, refusal: ApiError,
                        stopping: Drain | None) -> ApiError:
        """What the client is told of ``refusal`` (:func:`as_answered`). Whether the key may see the model
        is a policy query, as slow as its decision can be: like the decision's wait, it ends at ``stopping``'s
        cut (:class:`Cut`, refused 503 ``shutting_down`` by :meth:`admit`), or a stop would leave the request
        to uvicorn's graceful timeout (a plain-text 500, no entry: probe q1 F3)."""
        if stopping is None:
            return await as_answered(self.seen_models, principal, spec, asked, refusal)
        return await stopping.unless_cut(lambda: as_answered(self.seen_models, principal, spec, asked, refusal))

    async def _read(self, request_id: str, principal: Principal, endpoint: str, raw: bytes,
                    purpose_headers: Sequence[str],
                    stopping: Drain | None = None) -> tuple[Request, ModelSpec, str | None]:
        """Parse the body and the declared purpose and check the model can take the body; a refused body
        (or purpose) is recorded as ``rejected``."""
        request: Request | None = None
        spec: ModelSpec | None = None
        try:
            request = parse_body(raw, REQUEST_SHAPES[endpoint])
            purpose = declared_purpose(purpose_headers, request.metadata)
            spec = self.registry.get(request.model)
            if spec is None:
                raise model_not_found(request.model)
            note_model(spec.name)
            check_fits(request, spec)
        except ApiError as error:
            answer = error
            if request is not None and spec is not None:  # a body that does not fit a model the key may not see
                answer = await self._answered(principal, spec, request.model, error, stopping)
            await self.request_log.record_rejection(request_id, principal, endpoint, error, raw,
                                                    answered=answered_record(error, answer))
            answer.request_id = request_id
            if answer is error:
                raise
            raise answer from None
        assert request is not None and spec is not None
        return request, spec, purpose

    async def _decide(self, request_id: str, principal: Principal, endpoint: str, request: Request,
                      spec: ModelSpec, purpose: str | None, requested_max: int,
                      messages: list[dict[str, str]] | None, prompt: str | None,
                      stopping: Drain | None = None) -> Verdict:
        """Ask the policy, showing it the principal's and team's usage; without usage, fail closed.

        ``stopping``: the wait for the decision ends at that drain's cut (:class:`Cut`, the early
        reservation undone), so that a stopping gateway answers it (probe q1 F1).

        The call that reads the usage also reserves, when the limits the
        policy will oblige can be guessed (see the module docstring).
        """
        counters_down, early = None, None
        guess = self._obliged.get((principal.id, principal.team, spec.name))
        try:
            if guess is None:
                usage = await self.counters.snapshot(principal.id, principal.team)
            else:
                prompt_tokens = await self.prompt_counter.count(spec, messages, prompt)
                tokens = (prompt_tokens_to_hold(prompt_tokens, prompt_text(messages, prompt))
                          + guess.completion_tokens(requested_max))
                # checked against the queue, but no place taken: the policy may deny it (probe p2 #1)
                reply = await self.counters.admit(
                    request_id, principal.id, principal.team, guess.limits, tokens,
                    queue=self._queue(spec, principal, guess.priority), place=False)
                usage, early = reply.usage, EarlyReservation(guess.limits, tokens, prompt_tokens, reply)
        except CountersUnavailable as exc:
            usage, counters_down = None, UsageUnavailable(str(exc))
        policy_input = build_input(principal=principal, endpoint=endpoint, model=spec, max_tokens=requested_max,
                                   stream=request.stream, purpose=purpose, messages=messages, prompt=prompt,
                                   usage=usage)
        if counters_down is not None:  # no counters, no decision
            decision = Decision.fail_closed("usage_unavailable",
                                            f"usage counters are unavailable: {counters_down.message}")
            return Verdict(decision, self.policy.revision, policy_input, counters_down)
        try:
            if stopping is None:
                decision, revision = await timed_decision(self.policy.decide_with_revision(policy_input))
            else:
                decision, revision = await stopping.unless_cut(
                    lambda: timed_decision(self.policy.decide_with_revision(policy_input)))
        except BaseException:
            if early is not None and early.reservation is not None:
                await undo_reservation(self.counters, early.reservation)
            raise
        # the gateway's own checks (max_tokens 0 refused, above the request clamped), as the reload trial applies
        return Verdict(checked_decision(decision, requested_max), revision, policy_input, early=early)

    async def _reserve(self, request_id: str, principal: Principal, spec: ModelSpec, decision: Decision,
                       params: SamplingParams, messages: list[dict[str, str]] | None, prompt: str | None,
                       early: EarlyReservation | None, *, defaulted: bool = False,
                       requested_max: int | None = None) -> Admitted | AdmissionRefusal:
        """Check the prompt fits, then hold the request's tokens against its limits and check the queue.

        ``defaulted``: the client gave no ``max_tokens``. Then a prompt that
        fits the context is never refused for the default's sake: the
        completion is bounded by the room left instead (OpenAI's API runs a
        left-out ``max_tokens`` to the context's end; chat UIs leave it out).

        The policy judged a snapshot of the counters; the reservation is the
        atomic check that enforces the same limits however many requests
        race. The early reservation stands if it was made under exactly the
        decision's limits and tokens; else it is replaced in one call. A
        standing early reservation took no place in the queue: the admitted
        request carries the check its push makes (see the module docstring).
        """
        max_tokens = params.max_tokens
        unservable = None if self.model_health is None else self.model_health.unservable(spec.name)
        if unservable is not None:  # no live worker, and its last one could not load it: not queued to time out
            if early is not None and early.reservation is not None:
                await undo_reservation(self.counters, early.reservation)
            return ModelUnavailable(spec.name, unservable)
        if early is not None:
            prompt_tokens = early.prompt_tokens
        else:
            prompt_tokens = await self.prompt_counter.count(spec, messages, prompt)  # text checked by check_fits
        if prompt_tokens is not None and prompt_tokens + max_tokens > spec.context_length:
            room = spec.context_length - prompt_tokens
            if defaulted and room >= 1:
                max_tokens = room
            else:
                if early is not None and early.reservation is not None:
                    await undo_reservation(self.counters, early.reservation)
                return ContextTooLong(prompt_tokens, max_tokens, spec.context_length, defaulted=defaulted,
                                      prompt_param="prompt" if prompt is not None else "messages")
        limits = decision.obligations.limits
        wanted = NO_LIMITS if limits is None else limits.to_document()
        held_prompt = prompt_tokens_to_hold(prompt_tokens, prompt_text(messages, prompt))
        reserved = held_prompt + max_tokens  # budgets count prompt and completion tokens
        priority = decision.obligations.priority
        key = (principal.id, principal.team, spec.name)
        cap = granted_cap(decision.obligations.max_tokens, requested_max, self._obliged.get(key)) \
            if requested_max is not None else None
        self._remember(principal, spec, Obliged(wanted, priority, cap))
        place_check = None
        if early is not None and early.limits == wanted and early.tokens == reserved:
            reply = early.reply
            place_check = self._queue(spec, principal, priority)  # it took no place: its push takes it
        else:
            try:
                reply = await self.counters.admit(request_id, principal.id, principal.team, wanted, reserved,
                                                  queue=self._queue(spec, principal, priority),
                                                  replace=None if early is None else early.reservation)
            except CountersUnavailable as exc:
                # Unanswered, the counters give back in the background what this request holds (the
                # early reservation, or the replacement if its script ran or runs late): the 503 does
                # not wait. Refused (an error reply), nothing was replaced: the early one is undone here.
                if exc.answered and early is not None and early.reservation is not None:
                    await undo_reservation(self.counters, early.reservation)
                return UsageUnavailable(str(exc))
        outcome = reply.outcome
        if isinstance(outcome, Refusal):
            if outcome.code == TOO_MANY_IN_FLIGHT:
                wait = await self._in_flight_wait(outcome.scope, spec)
                outcome = dataclasses.replace(outcome, retry_after_s=max(outcome.retry_after_s, wait))
            return OverLimit(outcome)
        if isinstance(outcome, QueueAtLimit):
            return QueueFull(outcome.waiting, outcome.limit, spec.name, principal.team, outcome.team)
        assert isinstance(outcome, Reservation) and reply.waiting is not None
        return Admitted(outcome, reserved, prompt_tokens, reply.waiting, max_tokens, place_check)

    async def _in_flight_wait(self, scope: Scope, spec: ModelSpec) -> int:
        return await in_flight_wait_s(self.redis, self.counters, scope, spec.name, queue_mode=self.queue_mode,
                                      timeout_s=self.request_timeout_s)

    async def _in_flight_estimate(self, principal: Principal, spec: ModelSpec, decision: Decision,
                                  policy_input: dict[str, Any]) -> Decision:
        """The denial with its ``too_many_in_flight`` reasons' ``retry_after_s`` (the policy's flat 1 s)
        replaced by when one of the refused scope's requests should end (gateway/limits/in_flight_wait.py).

        The principal's own limit decides when it binds (its requests are
        among its team's, so one of them ending frees both); else the team's.
        Every such reason gets that one estimate: the request may go then.
        """
        scope = Scope("principal", principal.id)
        limits = decision.obligations.limits
        if principal.team is not None and limits is not None and limits.team is not None:
            limit = limits.principal.in_flight
            usage = (policy_input.get("usage") or {}).get("principal") or {}
            if limit is None or usage.get("in_flight", 0) + 1 <= limit:
                scope = Scope("team", principal.team)
        wait = await self._in_flight_wait(scope, spec)
        reasons = tuple(dataclasses.replace(r, retry_after_s=max(r.retry_after_s or 1, wait))
                        if r.code == TOO_MANY_IN_FLIGHT else r for r in decision.reasons)
        return dataclasses.replace(decision, reasons=reasons)

    async def _prompt_tokens(self, spec: ModelSpec, verdict: Verdict, messages: list[dict[str, str]] | None,
                             prompt: str | None) -> int | None:
        """The prompt's tokens: the early reservation's count, else counted now."""
        early = verdict.early
        return early.prompt_tokens if early is not None else await self.prompt_counter.count(spec, messages, prompt)

    @staticmethod
    def _held(prompt_tokens: int | None, decision: Decision, requested_max: int,
              messages: list[dict[str, str]] | None, prompt: str | None) -> tuple[int, int]:
        """What admitting the request would hold: its tokens, and the ``max_tokens`` among them (the decision's,
        clamped; p2 #4)."""
        granted = decision.obligations.max_tokens
        max_tokens = granted if 1 <= granted <= requested_max else requested_max
        return prompt_tokens_to_hold(prompt_tokens, prompt_text(messages, prompt)) + max_tokens, max_tokens

    async def _never_passes(self, spec: ModelSpec, decision: Decision, verdict: Verdict,
                            request: Request, requested_max: int,
                            messages: list[dict[str, str]] | None,
                            prompt: str | None) -> tuple[str | None, ContextTooLong | None]:
        """For a denial that would be a 429 (every reason a limit that passes): why no wait lets it pass a limit
        (:func:`alone_over_a_limit`, with its prompt's tokens too), or the model's context it does not fit.

        Until 2026-12-06 (probe s59 H1, H3) only its ``max_tokens`` was weighed here: a request whose prompt
        and ``max_tokens`` together exceed a token limit, or the model's context, was told to retry after the
        window (a day's budget: after midnight), and then refused for good. Counting the prompt costs a
        tokenization only on such a denial with no early reservation.
        """
        never = alone_over_a_limit(decision.obligations)
        if never is not None or not decision.reasons or \
                not all(r.code in LIMIT_CODES for r in decision.reasons):
            return never, None
        prompt_tokens = await self._prompt_tokens(spec, verdict, messages, prompt)  # None: no tokenizer here
        tokens, max_tokens = self._held(prompt_tokens, decision, requested_max, messages, prompt)
        defaulted = not request.max_tokens_given
        if prompt_tokens is not None and prompt_tokens + max_tokens > spec.context_length and not (
                defaulted and spec.context_length - prompt_tokens >= 1):
            return None, ContextTooLong(prompt_tokens, max_tokens, spec.context_length, defaulted=defaulted,
                                        prompt_param="prompt" if prompt is not None else "messages")
        return alone_over_a_limit(decision.obligations, tokens=tokens), None

    async def _minute_estimate(self, request_id: str, principal: Principal, spec: ModelSpec, decision: Decision,
                               verdict: Verdict, requested_max: int, messages: list[dict[str, str]] | None,
                               prompt: str | None) -> Decision:
        """The denial with its ``rate_limited`` reasons' wait as the counters compute it
        (gateway/requests/minute_wait.py): the policy's is when the oldest entry leaves the minute."""
        early = verdict.early
        prompt_tokens = await self._prompt_tokens(spec, verdict, messages, prompt)
        tokens, _ = self._held(prompt_tokens, decision, requested_max, messages, prompt)
        wanted = decision.obligations.limits.to_document() if decision.obligations.limits is not None else None
        if early is not None and early.reservation is None and early.tokens == tokens and early.limits == wanted:
            return await with_minute_wait(decision, self.counters, request_id, principal.id, principal.team,
                                          early.tokens, (early.limits, early.reply))
        # None; or made for other tokens or limits (a reload, a key's new roles: the remembered cap and limits
        # were a former decision's, and its wait is theirs: probe q2 F1); or a reservation that fit (undone by
        # the caller: the policy judged another moment): ask the counters for these tokens under these limits
        return await with_minute_wait(decision, self.counters, request_id, principal.id, principal.team, tokens, None)

    def _queue(self, spec: ModelSpec, principal: Principal, priority: int | None) -> QueueCheck:
        """The queue check of this request: its team's places (fair), or the model's total (fifo)."""
        if self.queue_mode == MODE_FAIR:
            return fair_model_queue(spec.name, principal.team, self.max_queued_per_model)
        return model_queue(spec.name, self.max_queued_per_model, priority)

    def _remember(self, principal: Principal, spec: ModelSpec, obliged: Obliged) -> None:
        """Keep what an allowed decision obliged, to reserve against it with the next snapshot."""
        key = (principal.id, principal.team, spec.name)
        if self._obliged.get(key) == obliged:
            return
        if len(self._obliged) >= _GUESSES_KEPT:
            del self._obliged[next(iter(self._obliged))]
        self._obliged[key] = obliged
