"""Writing a request's audit entries: its request entry, a rejection, its one terminal entry.

The request entry is written before anything is queued, and a request whose
entry cannot be written is refused (503): nothing is served unaudited. A
terminal entry the database refuses is kept pending and written later, and
the database's unique constraint on terminal entries settles any race with
the worker.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

from audit import AppendArgs, AuditEntry, AuditError, AuditStore, DuplicateTerminalError
from audit.kinds import DELIVERED, FAILED
from gateway.auth import Principal
from gateway.api_errors import ApiError
from gateway.observability.metrics import observe_append
from gateway.requests.append_queue import AppendQueue
from gateway.requests.audit_records import rejection_record
from gateway.requests.blocking_calls import BlockingCalls
from gateway.requests.ticket import Ticket
from workers.contract.pending_terminals import PendingTerminal, PendingTerminals
from workers.contract.privacy import Digester, split_texts
from workers.contract.terminal_body import withheld_body

log = logging.getLogger(__name__)


def _audit_unavailable(request_id: str | None = None) -> ApiError:
    """The refusal of a request whose entry the store refused."""
    return ApiError(503, "audit_unavailable", "The audit log cannot be written, so the request was refused "
                    "(nothing is served unaudited). Try again shortly.", request_id=request_id)


class RequestLog:
    """The audit store as the request path writes to it."""

    def __init__(self, audit: AuditStore, *, current_revision: Callable[[], str], digester: Digester,
                 pending: PendingTerminals | None = None) -> None:
        self.audit = audit
        #: The appends, written in batches by a thread of their own (``gateway/requests/append_queue.py``).
        self._appends = AppendQueue(audit, observe=observe_append)
        #: The store's other calls (look-ups, the pending terminals), on threads of their own
        #: (``gateway/requests/blocking_calls.py``: cheaper than anyio's).
        self._calls = BlockingCalls(name="govgate-audit")
        self._current_revision = current_revision
        self._digester = digester
        #: Terminal entries the database refused, written later (None: only logged).
        self._pending = pending

    async def record_request(self, request_id: str, principal: Principal, model: str, body: dict[str, Any],
                             revision: str) -> None:
        """Write the request entry; raise a 503 ``audit_unavailable`` if the store refuses it."""
        try:
            await self._append("request", request_id, principal, model, body, revision)
        except AuditError as exc:
            log.error("audit store unavailable, refusing %s: %s", request_id, exc)
            raise _audit_unavailable() from None

    async def record_rejection(self, request_id: str, principal: Principal, endpoint: str, error: ApiError,
                               raw: bytes, *, answered: dict[str, Any] | None = None) -> None:
        """Write the entry of a body refused before any decision; raise a 503 ``audit_unavailable`` (in
        place of the refusal) if the store refuses it.

        A refusal answered without its entry was a request the log never saw
        (the database locked past its busy timeout: the client got its 4xx, the
        log one error line): as for a request entry, nothing is answered
        unaudited, and the client, told to try again, gets its refusal then.

        ``answered``: what the client was told instead of ``error``, if anything else
        (``gateway/requests/hidden_models.py``)."""
        body = rejection_record(endpoint, principal.key_id, error, raw, self._digester)
        if answered is not None:
            body["answered"] = answered
        try:
            await self._append("rejected", request_id, principal, None, body)
        except AuditError as exc:
            log.error("audit store unavailable, could not record rejection %s (%s): %s", request_id, error.code,
                      exc)
            raise _audit_unavailable(request_id) from None

    async def end(self, ticket: Ticket, kind: str, body: dict[str, Any]) -> AuditEntry | None:
        """Write a terminal entry unless one exists; return the entry that ended the request.

        An entry a worker could not write comes first (it holds the output);
        an entry the database refuses is kept pending and written later.
        """
        try:
            if self._pending is not None:
                earlier = await self._calls.run(partial(self._pending.write_one, self.audit, ticket.request_id))
                if earlier is not None:
                    return earlier
            return await self._append(kind, ticket.request_id, ticket.principal, ticket.model, body,
                                      ticket.job.policy_revision)
        except DuplicateTerminalError:
            return await self.terminal_for(ticket.request_id)
        except AuditError as exc:
            log.error("could not record %s for %s: %s", kind, ticket.request_id, exc)
            if self._pending is not None:
                entry = PendingTerminal(kind=kind, request_id=ticket.request_id, principal=ticket.principal.id,
                                        team=ticket.principal.team, model=ticket.model, body=body,
                                        policy_revision=ticket.job.policy_revision)
                await self._calls.run(partial(self._pending.keep, entry))
            return None

    async def record_end(self, ticket: Ticket, kind: str, body: dict[str, Any], *,
                         withheld_client: dict[str, Any] | None = None) -> AuditEntry | None:
        """Write the terminal entry of an output a worker handed over.

        Unlike :meth:`end`, nothing kept pending is written first: what is kept
        for this request is the worker's fallback, which this entry replaces.
        Raises :class:`DuplicateTerminalError` if the request ended meanwhile
        (the fallback was written, or the gateway's own timeout). None: the
        database refused it, and it is kept pending as ``failed`` (``ended_as``
        its kind) in the fallback's place, to be written when the database is back.
        ``withheld_client``: the ``client_output`` fields of what the client
        received then (the output is withheld from it): kept in the body's
        place of the whole output's, which it never got (probe h9 F3).
        """
        try:
            return await self._append(kind, ticket.request_id, ticket.principal, ticket.model, body,
                                      ticket.job.policy_revision)
        except DuplicateTerminalError:
            raise
        except AuditError as exc:
            log.error("could not record %s for %s: %s", kind, ticket.request_id, exc)
            if self._pending is not None:
                if withheld_client is not None:
                    body = {**{k: v for k, v in body.items() if not k.startswith("client_output")}, **withheld_client}
                entry = PendingTerminal(kind=FAILED, request_id=ticket.request_id, principal=ticket.principal.id,
                                        team=ticket.principal.team, model=ticket.model,
                                        body=withheld_body(body, kind), policy_revision=ticket.job.policy_revision)
                await self._calls.run(partial(self._pending.keep, entry, replace=True))
            return None

    async def record_delivered(self, ticket: Ticket, body: dict[str, Any]) -> AuditEntry:
        """Append a checked stream's ``delivered`` entry (``gateway/requests/delivered.py``): not terminal, so
        it follows the end it completes. Raises :class:`AuditError` if the store refuses it."""
        return await self._append(DELIVERED, ticket.request_id, ticket.principal, ticket.model, body,
                                  ticket.job.policy_revision)

    async def aclose(self) -> None:
        """Wait for the appends still running (the gateway is stopping)."""
        await self._appends.aclose()
        await self._calls.aclose()

    async def terminal_for(self, request_id: str) -> AuditEntry | None:
        return await self._calls.run(partial(self.audit.terminal_for, request_id))

    async def entries_for(self, request_id: str) -> list[AuditEntry]:
        """Every entry of one request, oldest first (raises :class:`AuditError` if the store refuses)."""
        return await self._calls.run(partial(self.audit.entries_for, request_id))

    async def _append(self, kind: str, request_id: str, principal: Principal, model: str | None,
                      body: dict[str, Any], revision: str | None = None) -> AuditEntry:
        metadata, texts = split_texts(body)  # the texts go to the erasable payload
        return await self._appends.append(AppendArgs(kind, request_id, principal.id, principal.team, model,
                                                     metadata, revision or self._current_revision(), texts))
