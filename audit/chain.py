"""How an entry is hashed: canonical JSON and SHA-256, nothing else.

Pure functions without database access, so an exported trail can be
re-verified with this module alone. The exact byte format (floats, timestamps
included) is in docs/architecture.md, "Audit entries and the chain".
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Final, Mapping

GENESIS_HASH: Final = "0" * 64

#: Every stored field except ``hash``; the hashed JSON object has exactly these keys.
HASHED_FIELDS: Final[tuple[str, ...]] = (
    "seq",
    "created_at",
    "request_id",
    "kind",
    "principal",
    "team",
    "model",
    "body",
    "policy_revision",
    "terminal_request_id",
    "prev_hash",
)


#: One encoder for every canonical text: ``json.dumps`` with keyword
#: arguments builds a new encoder per call, which the append path would pay
#: for on every entry.
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

#: The hashed fields in the order canonical JSON writes them.
_SORTED_FIELDS: Final = tuple(sorted(HASHED_FIELDS))
if _SORTED_FIELDS[0] != "body":  # entry_payload_with_body splices the body in first
    raise ImportError("audit.chain: 'body' must be the first hashed field in sorted order")


def canonical_text(value: Any) -> str:
    """The canonical JSON of ``value`` as text (:func:`canonical_json` before UTF-8 encoding).

    Raises ``TypeError``/``ValueError`` if ``value`` is not plain JSON. The
    store keeps this text as the stored body, so it is built once per append.
    """
    return _ENCODER.encode(value)


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` deterministically; raises ``TypeError``/``ValueError`` if it is not plain JSON.

    ``allow_nan=False`` because NaN/Infinity are not JSON and PostgreSQL rejects them;
    non-UTF-8-encodable strings (lone surrogates) raise ``UnicodeEncodeError``.
    """
    return canonical_text(value).encode("utf-8")


def format_timestamp(moment: datetime) -> str:
    """The hashed form of a timestamp: UTC, always with microseconds, so it round-trips exactly."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def entry_payload(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON of an entry's hashed fields (``created_at`` may be a datetime).

    Insists on exactly :data:`HASHED_FIELDS` so a field can never be silently
    left out of (or smuggled into) the hash.
    """
    if set(fields) != set(HASHED_FIELDS):
        missing = sorted(set(HASHED_FIELDS) - set(fields))
        extra = sorted(set(fields) - set(HASHED_FIELDS))
        raise ValueError(f"hashed fields mismatch: missing={missing} extra={extra}")
    doc = dict(fields)
    if isinstance(doc["created_at"], datetime):
        doc["created_at"] = format_timestamp(doc["created_at"])
    return canonical_json(doc)


def entry_payload_with_body(fields: Mapping[str, Any], body_text: str) -> bytes:
    """:func:`entry_payload` for a body already in canonical JSON text.

    ``fields`` holds every hashed field but ``body``. The result is the same
    bytes as ``entry_payload({**fields, "body": json.loads(body_text)})``
    whenever ``body_text`` is canonical JSON of a JSON round-tripped value
    (:func:`canonical_text` of it): canonical JSON sorts keys at every level,
    so the entry's text is the body's text spliced in at ``"body"``, which
    sorts first. The append path uses this so the body is serialised once and
    those very characters are both hashed and stored.
    """
    if "body" in fields or set(fields) | {"body"} != set(HASHED_FIELDS):
        expected = sorted(set(HASHED_FIELDS) - {"body"})
        raise ValueError(f"hashed fields mismatch: expected {expected}, got {sorted(fields)}")
    doc = dict(fields)
    if isinstance(doc["created_at"], datetime):
        doc["created_at"] = format_timestamp(doc["created_at"])
    rest = _ENCODER.encode(doc)  # '{"created_at":…}', every other field in order
    return f'{{"body":{body_text},{rest[1:]}'.encode("utf-8")


def chain_hash(prev_hash: str, payload: bytes) -> str:
    """SHA-256 (hex) over the previous hash and the entry's canonical JSON."""
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(payload)
    return digest.hexdigest()


def entry_hash(fields: Mapping[str, Any]) -> str:
    """The hash an entry with these fields must carry (uses ``fields["prev_hash"]``)."""
    return chain_hash(fields["prev_hash"], entry_payload(fields))
