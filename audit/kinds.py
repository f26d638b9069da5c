"""The kinds of audit entry, in one place so the schema and the store agree.

The CHECK constraints in the schema are generated from these sets, so adding
a kind means a new migration as well as a change here.
"""

from __future__ import annotations

from typing import Final

#: A request was decided (accepted or denied); body has params, decision, reasons (texts in the payload).
REQUEST: Final = "request"
#: Invalid input from a known principal (never reached a decision).
REJECTED: Final = "rejected"
#: Terminal kinds: every accepted request ends in exactly one of these.
COMPLETION: Final = "completion"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
CANCELLED: Final = "cancelled"

#: What the client of a checked stream received, recorded by its gateway when the stream's terminal entry
#: (written first, by its worker) could not say: body ``{terminal_seq, ended_as, output_decision, client_output…}``.
DELIVERED: Final = "delivered"

#: The chain's format boundary: body ``{"format": 2}``; written by the store itself, never by callers.
CHAIN_FORMAT: Final = "chain_format"
#: Something about the chain itself was found wrong and recorded (e.g. by a checkpointer).
CHAIN_ANOMALY: Final = "chain_anomaly"
#: Key management on the chain.
KEY_CREATED: Final = "key_created"
KEY_REVOKED: Final = "key_revoked"
KEY_ROLES_CHANGED: Final = "key_roles_changed"
#: Review actions.
FLAGGED: Final = "flagged"
COMMENTED: Final = "commented"
DISPOSITIONED: Final = "dispositioned"
#: A reviewer read a prompt or an output.
PAYLOAD_READ: Final = "payload_read"
#: ``govgate audit prune`` erased payloads: body ``{before, count, first_seq, last_seq}``.
PAYLOADS_ERASED: Final = "payloads_erased"

TERMINAL_KINDS: Final[frozenset[str]] = frozenset({COMPLETION, FAILED, TIMED_OUT, CANCELLED})
KEY_KINDS: Final[frozenset[str]] = frozenset({KEY_CREATED, KEY_REVOKED, KEY_ROLES_CHANGED})
REVIEW_KINDS: Final[frozenset[str]] = frozenset({FLAGGED, COMMENTED, DISPOSITIONED})
KINDS: Final[frozenset[str]] = (
    frozenset({REQUEST, REJECTED, DELIVERED, CHAIN_FORMAT, CHAIN_ANOMALY, PAYLOAD_READ, PAYLOADS_ERASED})
    | TERMINAL_KINDS | KEY_KINDS | REVIEW_KINDS
)

#: The format boundary entry's request id and body (see :mod:`audit.chain`).
CHAIN_FORMAT_REQUEST_ID: Final = "chain-format-2"


def sql_in_list(kinds: frozenset[str]) -> str:
    """Render ``kinds`` as a sorted SQL ``IN`` list for CHECK constraints (stable text)."""
    return "(" + ", ".join(f"'{k}'" for k in sorted(kinds)) + ")"
