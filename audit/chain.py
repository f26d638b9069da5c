"""How an entry is hashed: canonical JSON and SHA-256, nothing else.

Pure functions without database access, so an exported trail can be
re-verified with this module alone. The exact byte format (floats, timestamps
included) is in docs/architecture.md, "Audit entries and the chain".

Two formats, told apart by the ``chain_format`` entry ``{"format": 2}`` on
the chain itself (it and every entry before it are format 1):

- format 1 hashes :data:`HASHED_FIELDS`, the body included with its texts;
- format 2 hashes :data:`HASHED_FIELDS_V2`: the same plus ``payload_digest``,
  the SHA-256 of the entry's stored payload text (prompt, output), so the
  payload can be erased while the chain still verifies. The body is hashed
  as the very text stored (canonical JSON, spliced in byte for byte).
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
#: Format 2 adds the payload's digest (never the payload itself).
HASHED_FIELDS_V2: Final[tuple[str, ...]] = (*HASHED_FIELDS, "payload_digest")

FORMAT_1: Final = 1
FORMAT_2: Final = 2
#: The newest format: what the store appends after the boundary.
CURRENT_FORMAT: Final = FORMAT_2


#: One encoder for every canonical text: ``json.dumps`` with keyword
#: arguments builds a new encoder per call, which the append path would pay
#: for on every entry.
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

_FIELDS_BY_FORMAT: Final[dict[int, tuple[str, ...]]] = {FORMAT_1: HASHED_FIELDS, FORMAT_2: HASHED_FIELDS_V2}

#: The hashed fields in the order canonical JSON writes them.
if any(sorted(f)[0] != "body" for f in _FIELDS_BY_FORMAT.values()):  # the body is spliced in first
    raise ImportError("audit.chain: 'body' must be the first hashed field in sorted order")


def hashed_fields(format: int) -> tuple[str, ...]:
    """The fields an entry of ``format`` hashes; ``ValueError`` for an unknown format."""
    try:
        return _FIELDS_BY_FORMAT[format]
    except KeyError:
        raise ValueError(f"unknown audit chain format {format!r}") from None


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


def payload_digest(payload_bytes: bytes) -> str:
    """The ``payload_digest`` of a stored payload: hex SHA-256 of its stored (UTF-8) bytes."""
    return hashlib.sha256(payload_bytes).hexdigest()


def entry_payload(fields: Mapping[str, Any], *, format: int = FORMAT_1) -> bytes:
    """Canonical JSON of an entry's hashed fields (``created_at`` may be a datetime).

    Insists on exactly the format's fields (:func:`hashed_fields`) so a field
    can never be silently left out of (or smuggled into) the hash.
    """
    wanted = set(hashed_fields(format))
    if set(fields) != wanted:
        missing = sorted(wanted - set(fields))
        extra = sorted(set(fields) - wanted)
        raise ValueError(f"hashed fields mismatch: missing={missing} extra={extra}")
    doc = dict(fields)
    if isinstance(doc["created_at"], datetime):
        doc["created_at"] = format_timestamp(doc["created_at"])
    return canonical_json(doc)


def entry_payload_with_body(fields: Mapping[str, Any], body_text: str, *, format: int = FORMAT_1) -> bytes:
    """:func:`entry_payload` for a body already in canonical JSON text.

    ``fields`` holds every hashed field but ``body``. The result is the same
    bytes as ``entry_payload({**fields, "body": json.loads(body_text)})``
    whenever ``body_text`` is canonical JSON of a JSON round-tripped value
    (:func:`canonical_text` of it): canonical JSON sorts keys at every level,
    so the entry's text is the body's text spliced in at ``"body"``, which
    sorts first. The append path uses this so the body is serialised once and
    those very characters are both hashed and stored; format 2 is *defined*
    by this splice of the stored text (verify hashes what is stored, never a
    re-serialisation, so a non-canonical or duplicate-key body breaks the hash).
    """
    wanted = set(hashed_fields(format))
    if "body" in fields or set(fields) | {"body"} != wanted:
        expected = sorted(wanted - {"body"})
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


def entry_hash(fields: Mapping[str, Any], *, format: int = FORMAT_1) -> str:
    """The hash an entry of ``format`` with these fields must carry (uses ``fields["prev_hash"]``)."""
    return chain_hash(fields["prev_hash"], entry_payload(fields, format=format))


def document_hash(document: Mapping[str, Any]) -> str:
    """The hash of an entry document (:meth:`audit.entry.AuditEntry.to_document`).

    Uses the document's ``"format"`` (1 when absent, as in documents written
    before format 2) to pick the hashed fields; every other key (``hash``,
    ``payload``, ``format``) is ignored.
    """
    format = document.get("format", FORMAT_1)
    names = hashed_fields(format)
    return entry_hash({name: document[name] for name in names}, format=format)
