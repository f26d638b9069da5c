"""The exceptions the audit package raises.

Callers (the gateway, the workers) must *fail closed*: if an audit write does
not happen, the request is refused. That is only practical if every way an
append can fail arrives as one exception type, so the store translates driver
and SQLAlchemy errors into :class:`AuditError` (with the original chained as
``__cause__``) instead of letting database-specific exceptions leak out.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit trail could not be read or written; treat as "nothing recorded"."""


class DuplicateTerminalError(AuditError):
    """A request already has its terminal entry; a second one was refused.

    Raised when the database's UNIQUE constraint on ``terminal_request_id``
    rejects the insert, so it holds across processes, not just in this one.
    """

    def __init__(self, request_id: str, existing_kind: str | None = None) -> None:
        self.request_id = request_id
        self.existing_kind = existing_kind
        already = f" (already {existing_kind})" if existing_kind else ""
        super().__init__(f"request {request_id!r} already has a terminal audit entry{already}")


class InvalidEntryError(AuditError, ValueError):
    """The caller passed something that cannot be recorded faithfully.

    Also a :class:`ValueError` because it is a programming error on the
    caller's side, yet still an :class:`AuditError` so that fail-closed
    handlers catching only ``AuditError`` refuse the request.
    """


class CorruptEntryError(AuditError):
    """A stored row cannot be decoded (e.g. its body is no longer valid JSON).

    Only tampering or disk corruption produces this; ``seq`` names the row
    when known, so verification can report it as the first bad entry.
    """

    def __init__(self, seq: int | None, detail: str) -> None:
        self.seq = seq
        which = f"audit entry {seq}" if seq is not None else "an audit entry"
        super().__init__(f"{which} cannot be decoded: {detail}")
