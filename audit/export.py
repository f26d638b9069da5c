"""Entries as documents for people and files: with or without their texts, as JSONL or CSV, streamed.

What a reader sees of an entry is decided here once, for the review API and
the CLI alike: every field as :meth:`audit.entry.AuditEntry.to_document`
gives it, except the texts of prompts and outputs (the ``payload``, and in
entries written before it existed the body's ``messages``, ``prompt`` and
``output``) unless the caller asked for them, since each such read must be
audited by whoever serves it. A document that had texts taken out says so
in ``withheld``: its ``hash`` can then no longer be recomputed from the
document alone, and a verifier knows why. A document may also be shown
without the chain's ``prev_hash`` and ``hash`` (``with_chain=False``, also
listed in ``withheld``): the review API's view for a key that reads only its
own entries, in which an entry may be shown as its client was told it
(gateway/review/as_told.py), and whose hash would tell it from the entry
recorded.

A CSV export is opened in spreadsheets, which run a cell that starts with
``=``, ``+``, ``-`` or ``@`` (and, in some, a tab or a carriage return) as
a formula: a prompt or a principal named ``=HYPERLINK(…)`` would become a
link or worse on a compliance reviewer's screen (OWASP "CSV injection").
So a CSV cell starting with one of those, or with ``'`` itself, gets one
``'`` in front (:func:`csv_safe`): spreadsheets show the text as text, and
removing the one leading ``'`` of any cell that starts with it gives the
value back exactly. JSONL is for programs and keeps every value as is.

The writers turn an iterator of entries into an iterator of ``bytes``
chunks, so an export of any size holds one batch of rows and one chunk in
memory (:func:`audit.search.iter_matching` reads the rows in keyset batches).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Final, Iterable, Iterator

from .entry import AuditEntry
from .search import TEXT_FIELDS

FORMATS: Final = ("jsonl", "csv")
#: The charset of text/csv is added by Litestar (UTF-8) to every text/* answer: naming it here sent it twice.
MEDIA_TYPES: Final = {"jsonl": "application/x-ndjson", "csv": "text/csv"}

#: CSV columns, in order: the entry's fields, the body (and payload, when kept) as JSON text.
CSV_COLUMNS: Final = ("seq", "created_at", "request_id", "kind", "principal", "team", "model", "policy_revision",
                      "terminal_request_id", "prev_hash", "hash", "payload_digest", "withheld", "body", "payload")

#: What a CSV cell may not start with unprotected: formula triggers, and the quote that protects them.
FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")
_QUOTED: Final = (*FORMULA_TRIGGERS, "'")

#: Roughly how many bytes a chunk gathers before it is handed on (fewer, larger writes).
CHUNK_BYTES: Final = 64 * 1024


def has_text(entry: AuditEntry) -> bool:
    """True when the entry holds a prompt's or an output's text (a read of it must be audited)."""
    if getattr(entry, "payload", None) is not None:
        return True
    return any(name in entry.body for name in TEXT_FIELDS)


#: The chain's fields, left out of a document shown ``with_chain=False``.
CHAIN_FIELDS: Final = ("prev_hash", "hash")


def entry_document(entry: AuditEntry, *, with_text: bool, with_chain: bool = True) -> dict[str, Any]:
    """The entry as plain JSON; without its texts unless ``with_text``, without ``prev_hash`` and ``hash``
    unless ``with_chain`` (see the module docstring)."""
    document = entry.to_document()
    # The payload is not a hashed field: to_document may leave it out; a reader wants both.
    document.setdefault("payload_digest", getattr(entry, "payload_digest", None))
    document.setdefault("payload", getattr(entry, "payload", None))
    withheld: list[str] = []
    if not with_text:
        body = document.get("body")
        if isinstance(body, dict) and any(name in body for name in TEXT_FIELDS):
            document["body"] = {key: value for key, value in body.items() if key not in TEXT_FIELDS}
            withheld += [f"body.{name}" for name in TEXT_FIELDS if name in body]
        if document.get("payload") is not None:
            document["payload"] = None
            withheld.append("payload")
    if not with_chain:
        document.update(dict.fromkeys(CHAIN_FIELDS))
        withheld += CHAIN_FIELDS
    if withheld:
        document["withheld"] = withheld
    return document


def jsonl_chunks(entries: Iterable[AuditEntry], *, with_text: bool, with_chain: bool = True) -> Iterator[bytes]:
    """One JSON object per line (keys sorted, UTF-8), gathered into chunks."""
    return _chunked(json.dumps(entry_document(entry, with_text=with_text, with_chain=with_chain),
                               ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"
                    for entry in entries)


def csv_chunks(entries: Iterable[AuditEntry], *, with_text: bool, with_chain: bool = True) -> Iterator[bytes]:
    """A header row, then one row per entry (RFC 4180 quoting; body and payload as JSON text)."""
    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        for entry in entries:
            writer.writerow(_csv_row(entry_document(entry, with_text=with_text, with_chain=with_chain)))
            if buffer.tell() >= CHUNK_BYTES:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()
    return _chunked(lines())


def chunks(fmt: str, entries: Iterable[AuditEntry], *, with_text: bool, with_chain: bool = True) -> Iterator[bytes]:
    """The writer for ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "jsonl":
        return jsonl_chunks(entries, with_text=with_text, with_chain=with_chain)
    if fmt == "csv":
        return csv_chunks(entries, with_text=with_text, with_chain=with_chain)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}")


def csv_safe(text: str) -> str:
    """``text`` as a CSV cell no spreadsheet runs as a formula: a ``'`` in front of a risky first character.

    A text that starts with ``'`` gets one more, so that dropping the first
    ``'`` of every cell that has one restores every value exactly.
    """
    return "'" + text if text.startswith(_QUOTED) else text


def _csv_row(document: dict[str, Any]) -> list[str]:
    def cell(name: str) -> str:
        value = document.get(name)
        if value is None:
            return ""
        if name in ("body", "payload", "withheld"):
            return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return str(value)
    return [csv_safe(cell(name)) for name in CSV_COLUMNS]


def _chunked(pieces: Iterable[str]) -> Iterator[bytes]:
    gathered: list[str] = []
    size = 0
    for piece in pieces:
        gathered.append(piece)
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield "".join(gathered).encode("utf-8")
            gathered, size = [], 0
    if gathered:
        yield "".join(gathered).encode("utf-8")
