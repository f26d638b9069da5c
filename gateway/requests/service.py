"""The request path behind both OpenAI endpoints: admit a request, then run it to its outcome.

Its ordering is the product's promise (docs/architecture.md): a request is
recorded in the audit log, with its decision and policy revision, before
anything is queued, and is refused (503) if that record cannot be written;
denied requests and invalid input from a known principal are recorded too;
an accepted request ends in exactly one terminal entry.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Sequence

import redis.asyncio as aioredis

from audit import AuditStore
from gateway.auth import Principal
from gateway.auth.revocations import AdmittedKeys
from gateway.dispatch import Dispatcher, ResultWaiter
from gateway.dispatch.model_health import ModelHealth
from gateway.api_errors import errors_of
from gateway.drain import Drain
from gateway.limits import UsageCounters
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.api_errors import ApiError
from gateway.requests.admission import Admission
from gateway.requests.call_off import KEY_REVOKED
from gateway.requests.cancelled_ends import withdrawn_end
from gateway.requests.delivered import record_delivered
from gateway.requests.outcome import ClientGone, TicketRunner
from gateway.requests.timeouts import STOP_GRACE_S
from gateway.requests.output_rules import OutputRules
from gateway.requests.request_log import RequestLog
from gateway.requests.stream_events import StreamEvents
from gateway.requests.ticket import Ticket
from workers.contract.fair_queues import MODE_FIFO
from workers.contract.jobs import JobResult
from workers.contract.pending_terminals import PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.registry import Registry

log = logging.getLogger(__name__)


class CompletionService:
    """One entry point for the controllers; every error it raises is an ``ApiError`` naming the request."""

    def __init__(self, *, registry: Registry, policy: ReloadingPolicyEngine, audit: AuditStore,
                 dispatcher: Dispatcher, waiter: ResultWaiter, redis: aioredis.Redis, counters: UsageCounters,
                 default_max_tokens: int, request_timeout_s: float, max_queued_per_model: int,
                 digester: Digester, pending: PendingTerminals | None = None, queue_mode: str = MODE_FIFO,
                 admission_concurrency: int = 0, admission_wait_s: float = 5.0,
                 output_rules: OutputRules | None = None, model_health: ModelHealth | None = None,
                 timeout_grace_s: float = STOP_GRACE_S, end_retry_interval_s: float = 5.0,
                 end_retry_horizon_s: float = 86400.0, admitted_keys: AdmittedKeys | None = None,
                 lost_after_s: float | None = None) -> None:
        request_log = RequestLog(audit, current_revision=lambda: policy.revision, digester=digester,
                                 pending=pending)
        self.request_log = request_log
        self.admission = Admission(registry=registry, policy=policy, counters=counters, request_log=request_log,
                                   redis=redis, digester=digester, default_max_tokens=default_max_tokens,
                                   max_queued_per_model=max_queued_per_model, queue_mode=queue_mode,
                                   concurrency=admission_concurrency, gate_wait_s=admission_wait_s,
                                   model_health=model_health, request_timeout_s=request_timeout_s,
                                   lost_after_s=lost_after_s)
        self.runner = TicketRunner(dispatcher=dispatcher, waiter=waiter, redis=redis, counters=counters,
                                   request_log=request_log, digester=digester, request_timeout_s=request_timeout_s,
                                   output_rules=output_rules, stop_grace_s=timeout_grace_s,
                                   end_retry_interval_s=end_retry_interval_s,
                                   end_retry_horizon_s=end_retry_horizon_s)
        #: This gateway's requests in flight by key id, ended when their key is revoked (the key-change
        #: listener feeds it: ``gateway/components.py``); without one, a revocation ends none.
        self.admitted_keys = admitted_keys if admitted_keys is not None else AdmittedKeys(_not_told)

    async def admit(self, principal: Principal, endpoint: str, read_body: Callable[[], Awaitable[bytes]],
                    purpose_headers: Sequence[str] = (), *, stopping: Drain | None = None) -> Ticket:
        """Read, decide, reserve and record a request (see :class:`Admission`); ``stopping``: refused once
        that drain has begun."""
        return await self.admission.admit(principal, endpoint, read_body, purpose_headers, stopping=stopping)

    async def revoked_before_queue(self, ticket: Ticket) -> ApiError:
        """End an admitted request whose key was revoked before its job was queued: ``cancelled``, its
        reservation released; the 401 ``invalid_api_key`` to raise."""
        error = await withdrawn_end(self.runner, ticket, KEY_REVOKED)
        error.request_id = ticket.request_id
        return error

    async def complete(self, ticket: Ticket, gone: ClientGone | None = None,
                       cut: ClientGone | None = None, stopping: Drain | None = None) -> JobResult:
        """Queue an admitted request and wait for its result (``gone``, ``cut``, ``stopping``: see
        ``TicketRunner.complete``)."""
        with errors_of(ticket.request_id):
            return await self.runner.complete(ticket, gone, cut, stopping)

    async def left_before_its_answer(self, ticket: Ticket) -> None:
        """The client of a non-streamed request closed its connection while its end was being recorded: the
        answer goes nowhere (the server drops what is sent on a closed connection), so the end's
        ``client_output`` (what the client was to receive) is completed by a ``delivered`` entry saying that
        it received nothing (``gateway/requests/delivered.py``; probe s54 A2)."""
        log.info("the client of %s closed its connection before its answer was sent", ticket.request_id)
        await record_delivered(self.runner, ticket, None, "")

    async def open_stream(self, ticket: Ticket, stopping: Drain | None = None) -> StreamEvents:
        """Queue an admitted streaming request; its events are text pieces, then the result (``stopping``:
        its drain's cut ends it before its job is queued)."""
        with errors_of(ticket.request_id):
            return await self.runner.open_stream(ticket, stopping)

    async def aclose(self) -> None:
        await self.runner.aclose()
        await self.request_log.aclose()


async def _not_told(_key_id: str) -> bool | None:
    """A service with no key-change listener never hears of a change; asked anyway, it cannot tell."""
    return None
