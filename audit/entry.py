"""The value callers get back: a frozen, session-free snapshot of one entry.

The store reads rows with SQLAlchemy Core and converts them to this
dataclass, so callers never hold a session or a lazily-loaded ORM object
and cannot accidentally write back through one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from .chain import HASHED_FIELDS, entry_hash, format_timestamp
from .kinds import TERMINAL_KINDS


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the trail as stored. ``body`` is a plain dict (do not mutate it)."""

    seq: int
    created_at: datetime
    request_id: str
    kind: str
    principal: str | None
    team: str | None
    model: str | None
    body: dict[str, Any]
    policy_revision: str | None
    terminal_request_id: str | None
    prev_hash: str
    hash: str
    payload: dict[str, Any] | None = None
    payload_digest: str | None = None

    @property
    def is_terminal(self) -> bool:
        """True for completion/failed/timed_out/cancelled entries."""
        return self.kind in TERMINAL_KINDS

    def hashed_fields(self) -> dict[str, Any]:
        """Every field except ``hash``: the input to :func:`audit.chain.entry_hash`."""
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def to_document(self) -> dict[str, Any]:
        """Every field as plain JSON (time in its hashed ISO form), for export and display.

        ``hash`` can be re-checked from the document alone: ``entry_hash`` of
        the document without ``hash`` equals it.
        """
        return {**self.hashed_fields(), "created_at": format_timestamp(self.created_at), "hash": self.hash}

    def expected_hash(self) -> str:
        """What ``hash`` should be, recomputed from the other fields."""
        return entry_hash(self.hashed_fields())

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "AuditEntry":
        """Build from a Core result row mapping with the table's column names."""
        return cls(
            seq=row["seq"],
            created_at=row["created_at"],
            request_id=row["request_id"],
            kind=row["kind"],
            principal=row["principal"],
            team=row["team"],
            model=row["model"],
            body=row["body"],
            policy_revision=row["policy_revision"],
            terminal_request_id=row["terminal_request_id"],
            prev_hash=row["prev_hash"],
            hash=row["hash"],
            payload=row["payload"],
            payload_digest=row["payload_digest"],
        )
