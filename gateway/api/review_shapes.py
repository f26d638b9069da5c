"""The review API's response shapes, as msgspec structs: what ``/schema/openapi.json`` promises for ``/v1/audit``.

As in :mod:`gateway.api.shapes`, the routes build plain dicts
(``gateway/review/service.py``, ``audit/export.py``) and these structs
describe them, closed (``additionalProperties: false``), so the schema
tests fail on a field the description does not know. An entry's ``body``
and ``payload`` stay open objects: their fields depend on the entry's kind
and on the policy's obligations. Class docstrings become the schemas'
descriptions, so they are Markdown.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from audit.kinds import KINDS

#: Every kind of entry, as the description's enum.
Kind = Literal[tuple(sorted(KINDS))]  # type: ignore[valid-type]
Disposition = Literal["ok", "violation", "needs-follow-up"]


class _Closed(msgspec.Struct, forbid_unknown_fields=True):
    """A shape with exactly these fields."""


class AuditEntryDocument(_Closed):
    """One audit entry as stored (`audit/export.py`). Texts of prompts and outputs are left out unless
    `include_text=true` was asked (and the read recorded): `withheld` then names what was left out, and the
    `hash` can only be recomputed from the document if `withheld` names nothing but `payload`. A key that
    reads only its own entries reads them as its client was told them (a request for a model it may not see
    is shown as the `rejected` entry of an unknown name), without `prev_hash` and `hash` (null, and named in
    `withheld`)."""

    seq: int
    created_at: str
    request_id: str
    kind: Kind
    principal: str | None
    team: str | None
    model: str | None
    policy_revision: str | None
    terminal_request_id: str | None
    prev_hash: str | None
    hash: str | None
    body: dict[str, Any]
    payload: dict[str, Any] | None
    payload_digest: str | None
    format: Literal[1, 2]
    withheld: list[Literal["payload", "body.messages", "body.prompt", "body.output", "prev_hash",
                           "hash"]] | UnsetType = UNSET


class AuditEntryList(_Closed):
    """`GET /v1/audit/entries`: one page, in the asked order; `next_cursor` is the next page's `cursor`."""

    object: Literal["list"]
    data: list[AuditEntryDocument]
    has_more: bool
    next_cursor: str | None


class AuditRequestStory(_Closed):
    """`GET /v1/audit/requests/{request_id}`: one request's whole story. `reads` (the `payload_read` entries
    that read its texts, up to 500) only for reviewers and auditors."""

    object: Literal["audit.request"]
    request_id: str
    principal: str | None
    team: str | None
    model: str | None
    policy_revision: str | None
    status: Literal["completion", "failed", "timed_out", "cancelled", "denied", "unavailable", "rejected",
                    "not_admitted", "pending"]
    decision: dict[str, Any] | None
    flagged: bool
    disposition: Disposition | None
    entries: list[AuditEntryDocument]
    review: list[AuditEntryDocument]
    reads: list[AuditEntryDocument] | UnsetType = UNSET


class UsageRow(_Closed, kw_only=True):
    """The counts of one group; it holds the `group_by` names asked for (`null`: entries without one)."""

    day: str | None | UnsetType = UNSET
    team: str | None | UnsetType = UNSET
    model: str | None | UnsetType = UNSET
    principal: str | None | UnsetType = UNSET
    requests: int
    allowed: int
    denied: int
    unavailable: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageDenials(_Closed, kw_only=True):
    """How often one reason code was given for denials (and refusals without a decision) in one group."""

    day: str | None | UnsetType = UNSET
    team: str | None | UnsetType = UNSET
    model: str | None | UnsetType = UNSET
    principal: str | None | UnsetType = UNSET
    reason: str | None
    count: int


class AuditUsage(_Closed):
    """`GET /v1/audit/usage`: requests, tokens and denials per group; `truncated` when groups were left out."""

    object: Literal["audit.usage"]
    group_by: list[Literal["day", "team", "model", "principal"]]
    data: list[UsageRow]
    denials: list[UsageDenials]
    truncated: bool
