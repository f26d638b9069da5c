"""The review API's work: search, one request's story, usage, review actions, export.

Every answer that shows the text of a prompt or an output (``include_text``)
or that matched one (``q``) is preceded by a ``payload_read`` entry on the
chain naming the reader and the requests read; if that entry cannot be
written, nothing is shown (503 ``audit_unavailable``), as a completion is
not served unaudited. Review actions (``flagged``, ``commented``,
``dispositioned``) are entries of their own on the chain, under the target's
request id, so a request's story holds its review and verification covers
it. A key that reads only its own entries reads them as its client was told
them (``gateway/review/as_told.py``): every read path here (search, story,
usage, export) matches and shows them so. Database calls run on worker
threads: the store is synchronous.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Final, Iterator, TypeVar

import anyio.to_thread

from audit import AuditEntry, AuditError, AuditStore
from audit.aggregates import usage
from audit.export import chunks, entry_document, has_text
from audit.filters import filter_document
from audit.kinds import (CHAIN_ANOMALY, CHAIN_FORMAT, COMMENTED, DELIVERED, DISPOSITIONED, FLAGGED, KEY_KINDS,
                         PAYLOAD_READ, PAYLOADS_ERASED, REJECTED, REQUEST, REVIEW_KINDS, TERMINAL_KINDS)
from audit.search import MAX_PAGE_SIZE, EntryFilter, iter_matching, search
from gateway.api_errors import ApiError, new_request_id
from gateway.observability.context import current_request_id
from gateway.review.access import Access
from gateway.review.as_told import as_told
from gateway.review.params import EntryQuery

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The dispositions a reviewer may record.
DISPOSITIONS: Final = ("ok", "violation", "needs-follow-up")
#: What each action route appends.
ACTION_KINDS: Final = {"flag": FLAGGED, "comment": COMMENTED, "disposition": DISPOSITIONED}
#: Entries a request is made of (a review action needs one of these to act on).
_REQUEST_KINDS: Final = frozenset({REQUEST, REJECTED, DELIVERED}) | TERMINAL_KINDS


def audit_unavailable() -> ApiError:
    return ApiError(503, "audit_unavailable", "The audit log cannot be read or written right now; nothing was "
                    "shown or recorded. Try again shortly.")


def request_not_found(request_id: str) -> ApiError:
    return ApiError(404, "request_not_found", "No audit entries for this request id that this key may read.",
                    param="request_id")


#: What the entries under an id that names no request are, as a refusal says it (in this order).
_NOT_A_REQUEST: Final = (
    (KEY_KINDS, "the key ledger (a key created, revoked or given new roles)"),
    (frozenset({PAYLOAD_READ}), "a read of requests' texts"),
    (frozenset({PAYLOADS_ERASED}), "an erasure of payloads"),
    (frozenset({CHAIN_FORMAT, CHAIN_ANOMALY}), "the audit chain's own records"),
    (REVIEW_KINDS, "review actions"),
)


def not_a_request(entries: list[AuditEntry]) -> ApiError:
    """404 for an id whose entries (that this key may read) are not a request's: a key's, a read's, ...

    Before, a read's or a key's id opened as a request page said only that
    no entries were found, though the search lists them under that id.
    """
    kinds = {entry.kind for entry in entries}
    what = [text for group, text in _NOT_A_REQUEST if kinds & group] or ["other records"]
    return ApiError(404, "request_not_found", f"This id names no request: its audit entries are {' and '.join(what)}"
                    f" ({', '.join(sorted(kinds))}). Search the entries by this request id to see them.",
                    param="request_id")


@dataclass(frozen=True)
class Answer:
    """A JSON body and the request id the response names (a ``payload_read`` or an action entry's)."""

    body: dict[str, Any]
    request_id: str | None = None


class ReviewService:
    """Reads and review actions over one audit store (built per request; it holds no state)."""

    def __init__(self, audit: AuditStore) -> None:
        self.audit = audit

    async def _run(self, call: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(call)
        except AuditError as exc:
            log.error("review: audit store unavailable: %s", exc)
            raise audit_unavailable() from None

    # -- reads ---------------------------------------------------------------

    async def search(self, access: Access, query: EntryQuery) -> Answer:
        where = _scoped(access, query.where)
        page = await self._run(partial(search, self.audit, where, newest_first=query.newest_first,
                                       limit=query.limit, cursor=query.cursor))
        entries = _shown(access, page.entries)
        read_id = None
        read = [e.request_id for e in entries if (query.include_text and has_text(e)) or where.text is not None]
        if read:
            read_id = await self._record_read(access, read, via="search", text_search=where.text is not None)
        body = {"object": "list",
                "data": [entry_document(entry, with_text=query.include_text, with_chain=access.sees_all)
                         for entry in entries],
                "has_more": page.next_cursor is not None,
                "next_cursor": None if page.next_cursor is None else str(page.next_cursor)}
        return Answer(body, read_id)

    async def story(self, access: Access, request_id: str, *, include_text: bool) -> Answer:
        entries = await self._run(partial(self.audit.entries_for, request_id))
        if not access.sees_all:
            entries = _shown(access, [entry for entry in entries if entry.principal == access.principal.id])
        own = [entry for entry in entries if entry.kind in _REQUEST_KINDS]
        if not own:
            raise not_a_request(entries) if entries else request_not_found(request_id)
        reads: list[AuditEntry] = []
        if access.sees_all:  # who read this request's texts (before this read)
            where = EntryFilter(read_of=request_id)
            reads = (await self._run(partial(search, self.audit, where, limit=MAX_PAGE_SIZE))).entries
            reads.reverse()
        read_id = None
        if include_text and any(has_text(entry) for entry in own):
            read_id = await self._record_read(access, [request_id], via="story", text_search=False)
        story = _story(request_id, own, [e for e in entries if e.kind in REVIEW_KINDS], include_text,
                       with_chain=access.sees_all)
        if access.sees_all:
            story["reads"] = [entry_document(entry, with_text=False) for entry in reads]
        return Answer(story, read_id)

    async def usage(self, access: Access, where: EntryFilter, groups: tuple[str, ...]) -> Answer:
        where = _scoped(access, where)
        result = await self._run(partial(usage, self.audit.engine, where, groups))
        return Answer({"object": "audit.usage", "group_by": list(result.groups), "data": result.rows,
                       "denials": result.denials, "truncated": result.truncated})

    async def export(self, access: Access, query: EntryQuery) -> tuple[str | None, Iterator[bytes]]:
        """The read entry's id (when texts are exported) and the chunks, read lazily as they are sent."""
        where = _scoped(access, query.where)
        read_id = None
        if query.include_text or where.text is not None:
            read_id = await self._record_read(access, [], via="export", text_search=where.text is not None,
                                              scope=filter_document(where))
        entries = iter_matching(self.audit, where, newest_first=query.newest_first)
        if not access.sees_all:
            entries = map(as_told, entries)
        return read_id, _logged(chunks(query.fmt, entries, with_text=query.include_text, with_chain=access.sees_all))

    # -- review actions --------------------------------------------------------

    async def act(self, access: Access, request_id: str, action: str, fields: dict[str, Any]) -> Answer:
        """Append a ``flagged``/``commented``/``dispositioned`` entry for an existing request."""
        access.require_reviewer()
        entries = await self._run(partial(self.audit.entries_for, request_id))
        target = next((entry for entry in entries if entry.kind in _REQUEST_KINDS), None)
        if target is None:
            raise not_a_request(entries) if entries else request_not_found(request_id)
        access.require_other_principal(action, target.principal)
        principal = access.principal
        body = {"key_id": principal.key_id, "roles": list(principal.roles), "reviewer_team": principal.team,
                "target": {"principal": target.principal, "team": target.team, "model": target.model,
                           "seq": target.seq}, **fields}
        # The entry's team is the reviewed request's, as its model is: a team's records (``--team`` of an
        # export or a bundle) then hold how its requests were judged, and not the notes its own reviewers
        # wrote on other teams' requests. Who judged is the entry's principal; their team is in the body.
        entry = await self._run(partial(self.audit.append, ACTION_KINDS[action], request_id, principal=principal.id,
                                        team=target.team, model=target.model, body=body,
                                        policy_revision=None))
        return Answer(entry_document(entry, with_text=False), request_id)

    async def _record_read(self, access: Access, request_ids: list[str], *, via: str, text_search: bool,
                           scope: dict[str, Any] | None = None) -> str:
        """Put "who read which requests' texts" on the chain before they are shown; 503 if it cannot be."""
        principal = access.principal
        read_id = current_request_id() or new_request_id()  # the HTTP request's id: header, entry and logs agree
        body: dict[str, Any] = {"key_id": principal.key_id, "roles": list(principal.roles), "via": via,
                                "request_ids": sorted(set(request_ids)), "text_search": text_search}
        if scope is not None:
            body["filter"] = scope
        await self._run(partial(self.audit.append, PAYLOAD_READ, read_id, principal=principal.id,
                                team=principal.team, model=None, body=body, policy_revision=None))
        return read_id


def _scoped(access: Access, where: EntryFilter) -> EntryFilter:
    """``where`` as this caller may ask it: its own entries, matched as told, unless it reads all."""
    return replace(where, principal=access.own_principal(where.principal), as_answered=not access.sees_all)


def _shown(access: Access, entries: list[AuditEntry]) -> list[AuditEntry]:
    """The entries as this caller reads them: as recorded for reviewers and auditors, else as told."""
    return entries if access.sees_all else [as_told(entry) for entry in entries]


#: A request the policy allowed but the gateway then refused (its request entry's ``admission`` says why):
#: ended with that refusal, not pending.
NOT_ADMITTED: Final = "not_admitted"


def _not_admitted(body: dict[str, Any]) -> bool:
    admission = body.get("admission")
    return isinstance(admission, dict) and admission.get("admitted") is False


def _story(request_id: str, entries: list[AuditEntry], review: list[AuditEntry], include_text: bool, *,
           with_chain: bool = True) -> dict[str, Any]:
    """One request from its entries: who, what was decided and why, how it ended, what reviewers said."""
    first = entries[0]
    request = next((entry for entry in entries if entry.kind == REQUEST), None)
    terminal = next((entry for entry in entries if entry.kind in TERMINAL_KINDS), None)
    decision = request.body.get("decision") if request is not None else None
    if terminal is not None:
        status = terminal.kind
    elif any(entry.kind == REJECTED for entry in entries):
        status = "rejected"
    elif isinstance(decision, dict) and decision.get("unavailable"):
        status = "unavailable"
    elif isinstance(decision, dict) and decision.get("allow") is False:
        status = "denied"
    elif request is not None and _not_admitted(request.body):
        status = NOT_ADMITTED  # allowed, then refused before any queue (too long, queue full, a limit): it ended
    else:
        status = "pending"
    dispositions = [entry for entry in review if entry.kind == DISPOSITIONED]
    return {
        "object": "audit.request",
        "request_id": request_id,
        "principal": first.principal,
        "team": first.team,
        "model": first.model,
        "policy_revision": (request or first).policy_revision,
        "status": status,
        "decision": decision,
        "flagged": any(entry.kind == FLAGGED for entry in review),
        "disposition": dispositions[-1].body.get("disposition") if dispositions else None,
        "entries": [entry_document(entry, with_text=include_text, with_chain=with_chain) for entry in entries],
        "review": [entry_document(entry, with_text=False, with_chain=with_chain) for entry in review],
    }


def _logged(parts: Iterator[bytes]) -> Iterator[bytes]:
    """Pass the chunks on; a read failing mid-stream is logged and cuts the response off (no clean end)."""
    try:
        yield from parts
    except AuditError as exc:
        log.error("review export cut off: the audit store failed mid-stream: %s", exc)
        raise
