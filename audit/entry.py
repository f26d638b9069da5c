"""The value callers get back: a frozen, session-free snapshot of one entry.

The store reads rows with SQLAlchemy Core and converts them to this
dataclass, so callers never hold a session or a lazily-loaded ORM object
and cannot accidentally write back through one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from .chain import CURRENT_FORMAT, entry_hash, format_timestamp, hashed_fields
from .kinds import TERMINAL_KINDS


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the trail as stored. ``body`` and ``payload`` are plain dicts (do not mutate them).

    ``payload`` holds the entry's erasable texts (the prompt or messages as
    ``prompt_logging`` allowed them, the output), with the random ``"salt"``
    the store added; None when the entry has none, or once ``govgate audit
    prune`` erased it (``payload_digest`` stays). ``format`` is the chain
    format the entry was hashed in (1 up to and including the
    ``chain_format`` boundary, 2 after it).
    """

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
    format: int = CURRENT_FORMAT

    @property
    def is_terminal(self) -> bool:
        """True for completion/failed/timed_out/cancelled entries."""
        return self.kind in TERMINAL_KINDS

    @property
    def payload_erased(self) -> bool:
        """True when the entry had a payload and it was erased (its digest is all that is left)."""
        return self.payload is None and self.payload_digest is not None

    def hashed_fields(self) -> dict[str, Any]:
        """The fields its format hashes (every stored field but ``hash`` and ``payload``)."""
        return {name: getattr(self, name) for name in hashed_fields(self.format)}

    def to_document(self) -> dict[str, Any]:
        """Every field as plain JSON (time in its hashed ISO form), for export and display.

        Holds ``format``, ``hash`` and ``payload`` besides the hashed fields;
        :func:`audit.chain.document_hash` of the document equals ``hash``.
        """
        return {**self.hashed_fields(), "created_at": format_timestamp(self.created_at), "hash": self.hash,
                "payload": self.payload, "payload_digest": self.payload_digest, "format": self.format}

    def expected_hash(self) -> str:
        """What ``hash`` should be, recomputed from the other fields.

        For format 2 this re-serialises the parsed body; :func:`audit.verify_chain`
        hashes the stored text itself, which is what catches a non-canonical body.
        """
        return entry_hash(self.hashed_fields(), format=self.format)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], format: int = CURRENT_FORMAT) -> "AuditEntry":
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
            format=format,
        )
