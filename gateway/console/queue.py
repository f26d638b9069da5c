"""The review queue: flagged and denied requests that no disposition has settled yet.

Built from three searches through the review service (the same queries,
access rules and auditing as ``GET /v1/audit/entries``): the newest
:data:`WINDOW` ``flagged`` entries, the newest :data:`WINDOW` denied
``request`` entries, and the ``dispositioned`` entries written since the
oldest of those. A request is waiting when it has no disposition newer than
its latest flag (a denied request: none at all), so flagging a request
again after its disposition puts it back. Older candidates than the window
are not looked at: the page says so when the window was full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from audit.kinds import DISPOSITIONED, FLAGGED
from gateway.review.access import Access
from gateway.review.params import entry_query
from gateway.review.service import ReviewService

#: Candidates read of each kind (the review API's largest page).
WINDOW: Final = 500
#: Pages of dispositions read at most (WINDOW each) to settle the candidates.
_MAX_DISPOSITION_PAGES: Final = 20


@dataclass(frozen=True)
class Waiting:
    """One request in the queue."""

    request_id: str
    why: tuple[str, ...]  # "flagged" and/or "denied"
    principal: str | None  # who made the request (not who flagged it)
    team: str | None
    model: str | None
    when: str  # the newest candidate entry's time
    note: str | None  # the latest flag's note
    reasons: tuple[str, ...]  # a denial's reason codes


@dataclass(frozen=True)
class Queue:
    waiting: list[Waiting]
    #: True when a window was full: older candidates exist that were not looked at.
    partial: bool


async def review_queue(service: ReviewService, access: Access) -> Queue:
    flags = await _page(service, access, {"kind": [FLAGGED]})
    denials = await _page(service, access, {"decision": ["deny"]})
    candidates = flags["data"] + denials["data"]
    if not candidates:
        return Queue([], False)
    oldest = min(entry["seq"] for entry in candidates)
    settled: dict[str, int] = {}  # request id → seq of its newest disposition
    cursor = None
    for _ in range(_MAX_DISPOSITION_PAGES):
        page = await _page(service, access, {"kind": [DISPOSITIONED], **({"cursor": [cursor]} if cursor else {})})
        for entry in page["data"]:
            settled.setdefault(entry["request_id"], entry["seq"])
        if not page["has_more"] or page["data"][-1]["seq"] < oldest:
            break
        cursor = page["next_cursor"]
    by_request: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(candidates, key=lambda e: e["seq"], reverse=True):
        by_request.setdefault(entry["request_id"], []).append(entry)
    waiting = []
    for request_id, entries in by_request.items():
        flagged = [e for e in entries if e["kind"] == FLAGGED]
        denied = [e for e in entries if e["kind"] != FLAGGED]
        disposed = settled.get(request_id)
        if disposed is not None and (not flagged or disposed > flagged[0]["seq"]):
            continue
        decision = (denied[0]["body"].get("decision") or {}) if denied else {}
        reasons = tuple(r.get("code", "") for r in decision.get("reasons", []) if isinstance(r, dict))
        why = tuple(name for name, hit in (("flagged", flagged), ("denied", denied)) if hit)
        note = flagged[0]["body"].get("note") if flagged else None
        who = denied[0] if denied else flagged[0]["body"].get("target") or {}
        waiting.append(Waiting(request_id, why, who.get("principal"), who.get("team"), who.get("model"),
                               entries[0]["created_at"], note, reasons))
    return Queue(waiting, flags["has_more"] or denials["has_more"])


async def _page(service: ReviewService, access: Access, params: dict[str, list[str]]) -> dict[str, Any]:
    query = entry_query({**params, "limit": [str(WINDOW)]})
    return (await service.search(access, query)).body
