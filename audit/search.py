"""Searching the audit trail: filters on columns and on the body's JSON, keyset pages on ``seq``.

Reviewers ask "what did this team send to that model last week, and what was
denied": the indexed columns (``created_at``, ``principal``, ``team``,
``model``, ``kind``, ``request_id``) narrow the rows, the body's JSON answers
the rest (decision, reason codes), and free text is a ``LIKE`` over the
stored texts of prompts and outputs. Pages are keyset-paginated on ``seq``
(the cursor is the last ``seq`` of a page), so a page costs the same at the
end of a million entries as at the start, and entries appended while a
reviewer pages never make a page repeat or skip one. The SQL is portable
between SQLite and PostgreSQL except where JSON arrays are unnested
(:func:`reason_codes_of`), which branches on the dialect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Iterator, Literal

from sqlalchemy import JSON, Engine, String, and_, cast, exists, false, func, literal_column, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from .chain import FORMAT_1, FORMAT_2
from .db import DB_ERRORS, describe, reason
from .entry import AuditEntry
from .errors import AuditError, CorruptEntryError
from .kinds import PAYLOAD_READ, REJECTED, REQUEST
from .store import AuditStore
from .tables import audit_table
from .time_order import SeqRange, seq_range

_t = audit_table.c

#: The largest page a search returns (a bigger ``limit`` is refused, not silently cut).
MAX_PAGE_SIZE: Final = 500
DEFAULT_PAGE_SIZE: Final = 50
#: Rows per read when a whole result is streamed (export): memory stays at one batch.
STREAM_BATCH: Final = 1000

Decision = Literal["allow", "deny", "unavailable"]
DECISIONS: Final = ("allow", "deny", "unavailable")

#: The keys of an entry's texts (``workers.contract.privacy.TEXT_KEYS``): in its payload, or in its
#: body for entries of chain format 1, written before the payload existed.
TEXT_FIELDS: Final = ("messages", "prompt", "output")

#: The LIKE escape character (not a backslash: JSON text is full of those).
_ESCAPE: Final = "!"

#: The ``code`` of a request entry's ``answered`` when its client was told the model does not exist (the
#: gateway's refusal of a model the key may not see: gateway/requests/hidden_models.py).
ANSWERED_AS_UNKNOWN_MODEL: Final = "model_not_found"


@dataclass(frozen=True)
class EntryFilter:
    """Which entries a search or an export wants; every field left ``None`` matches all.

    ``since`` is inclusive and ``until`` exclusive, both aware datetimes.
    ``read_of`` answers "who read this request's texts".
    ``decision`` and ``reason`` match ``request`` entries only (the kinds
    that carry a decision). ``text`` matches prompts and outputs as stored
    (case-insensitively for ASCII letters).

    ``as_answered`` matches each entry as its client was told it rather than
    as recorded: a ``request`` entry whose client was told its model does not
    exist (:func:`answered_as_unknown`) matches as the ``rejected`` entry of
    an unknown model's name would, that is as kind ``rejected``, with no
    model, no decision, no reason and no text. The review API sets it for a
    key that reads only its own entries, so no filter tells such a refusal
    from an unknown name's.
    """

    principal: str | None = None
    team: str | None = None
    model: str | None = None
    request_id: str | None = None
    kinds: frozenset[str] = field(default_factory=frozenset)
    decision: Decision | None = None
    reason: str | None = None
    #: ``payload_read`` entries that name this request id among the requests read.
    read_of: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None
    as_answered: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a search: its entries and the cursor of the next page (None on the last)."""

    entries: list[AuditEntry]
    next_cursor: int | None


def search(store: AuditStore, where: EntryFilter, *, newest_first: bool = True, limit: int = DEFAULT_PAGE_SIZE,
           cursor: int | None = None) -> Page:
    """One page of the entries matching ``where``, after ``cursor`` in the page order.

    Reads ``limit + 1`` rows to know whether another page follows, so the
    last page says so without a further, empty one.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be 1 to {MAX_PAGE_SIZE}")
    entries = _fetch(store, _page(store.engine, where, newest_first, cursor, limit + 1, _seqs(store.engine, where)))
    if len(entries) > limit:
        return Page(entries[:limit], entries[limit - 1].seq)
    return Page(entries, None)


def iter_matching(store: AuditStore, where: EntryFilter, *, newest_first: bool = False,
                  batch: int = STREAM_BATCH) -> Iterator[AuditEntry]:
    """Every entry matching ``where``, in constant memory: keyset batches, each its own short read.

    No transaction stays open between batches (a long export neither holds
    a snapshot nor blocks SQLite's WAL checkpoints). Entries appended during
    the scan are included when the order is oldest first.
    """
    cursor: int | None = None
    while True:
        entries = _fetch(store, _page(store.engine, where, newest_first, cursor, batch, _seqs(store.engine, where)))
        yield from entries
        if len(entries) < batch:
            return
        cursor = entries[-1].seq


def count_matching(engine: Engine, where: EntryFilter) -> int:
    """How many entries match ``where`` (the CLI's progress bar)."""
    try:
        with engine.connect() as conn:
            seqs = seq_range(conn, where.since, where.until)
            stmt = select(func.count()).select_from(audit_table).where(*conditions(where, engine.dialect.name, seqs))
            return int(conn.execute(stmt).scalar_one())
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc


def conditions(where: EntryFilter, dialect: str, seqs: SeqRange | None = None) -> list[ColumnElement[bool]]:
    """The WHERE clauses of ``where`` (shared with :mod:`audit.aggregates`).

    ``seqs``, the time range as a seq range (:func:`audit.time_order.seq_range`),
    replaces the ``created_at`` conditions: the same entries, picked from the
    ``(column, seq)`` indexes or the primary key.
    """
    clauses: list[ColumnElement[bool]] = []
    # With ``as_answered``, a request entry answered as an unknown model matches as an unknown name's rejection:
    # never by its model, decision, reasons or texts (which a rejection has none of), as a rejection by its kind.
    told = not_(answered_as_unknown()) if where.as_answered else None
    for column, value in ((_t.principal, where.principal), (_t.team, where.team), (_t.model, where.model),
                          (_t.request_id, where.request_id)):
        if value is not None:
            clauses.append(column == value)
    if where.model is not None and told is not None:
        clauses.append(told)
    if where.kinds:
        clauses.append(_kind_in(where.kinds, where.as_answered))
    if seqs is not None:
        if seqs.empty:
            clauses.append(false())
        if seqs.start is not None:
            clauses.append(_t.seq >= seqs.start)
        if seqs.stop is not None:
            clauses.append(_t.seq < seqs.stop)
    else:
        if where.since is not None:
            clauses.append(_t.created_at >= where.since)
        if where.until is not None:
            clauses.append(_t.created_at < where.until)
    if where.decision is not None:
        clauses.append(_t.kind == REQUEST)
        clauses.append(decision_is(where.decision))
    if where.reason is not None:
        clauses.append(_t.kind == REQUEST)
        clauses.append(has_reason(where.reason, dialect))
    if where.text is not None:
        clauses.append(text_matches(where.text))
    if told is not None and (where.decision is not None or where.reason is not None or where.text is not None):
        clauses.append(told)
    if where.read_of is not None:
        clauses.append(_t.kind == PAYLOAD_READ)
        clauses.append(names_read(where.read_of, dialect))
    return clauses


def answered_as_unknown() -> ColumnElement[bool]:
    """A ``request`` entry whose client was told its model does not exist (never NULL, so it can be negated).

    The gateway answers a request for a model the key may not see as it
    answers an unknown name, and records in the request entry's ``answered``
    what the client was told (gateway/requests/hidden_models.py).
    """
    code = func.coalesce(_t.body[("answered", "code")].as_string(), "")
    return and_(_t.kind == REQUEST, code == ANSWERED_AS_UNKNOWN_MODEL)


def _kind_in(kinds: frozenset[str], as_answered: bool) -> ColumnElement[bool]:
    """The entry's kind is one of ``kinds``; with ``as_answered``, the kind its client's answer gives it.

    Spelt so the ``(kind, seq)`` index still picks the candidates: ``kind IN
    (…)`` always leads, the request entries answered as unknown are told
    apart among them.
    """
    if not as_answered or (REQUEST in kinds) == (REJECTED in kinds):
        return _t.kind.in_(sorted(kinds))
    if REQUEST in kinds:  # requests, but not those shown as rejections
        return and_(_t.kind.in_(sorted(kinds)), not_(answered_as_unknown()))
    # rejections, and the requests shown as rejections
    return and_(_t.kind.in_(sorted(kinds | {REQUEST})), or_(_t.kind != REQUEST, answered_as_unknown()))


def decision_is(decision: Decision) -> ColumnElement[bool]:
    """A request entry's decision: allowed, denied by the policy, or refused for want of a decision."""
    allow = _t.body[("decision", "allow")].as_boolean()
    unavailable = _t.body[("decision", "unavailable")].as_boolean()
    if decision == "allow":
        return allow == true()
    if decision == "unavailable":
        return unavailable == true()
    return and_(allow == false(), or_(unavailable.is_(None), unavailable == false()))


def not_admitted() -> ColumnElement[bool]:
    """A request entry whose admission (after an allow) refused it: ``admission.admitted`` is false."""
    return _t.body[("admission", "admitted")].as_boolean() == false()


def admission_code() -> ColumnElement[Any]:
    """A refused admission's code (``rate_limited``, ``queue_full``, ``context_length_exceeded``, …)."""
    return _t.body[("admission", "code")].as_string()


def has_reason(code: str, dialect: str) -> ColumnElement[bool]:
    """The entry's decision lists a reason with this code (any position), or its admission was refused with it
    after an allow (a limit the atomic reservation found reached: probe s59 H2, such 429s were not found)."""
    items = ReasonItems.of(dialect)
    found = or_(exists(select(literal_column("1")).select_from(items.table).where(items.code == code, *items.where)),
                and_(admission_code() == code, not_admitted()))
    if not code.isascii():  # a format-1 body may hold it as \uXXXX escapes: no text pre-match
        return found
    # The code is in the body's stored text wherever it is in its reasons, so a LIKE (no JSON parsing)
    # drops most rows before the unnesting: a page of one reason code on a million entries 50.6 -> 12.4 ms p50.
    return and_(cast(_t.body, String).like(like_pattern(json_escaped(code)), escape=_ESCAPE), found)


@dataclass(frozen=True)
class ReasonItems:
    """The reason objects of ``audit_entries.body``'s decision as rows, beside the entry's own row.

    SQLite unnests a JSON array with ``json_each``, PostgreSQL with
    ``json_array_elements`` (the column is JSON, not JSONB). Both accept a
    function in FROM that reads a column of a table before it (PostgreSQL
    makes a function call in FROM lateral by itself), so the same join and
    the same correlated ``EXISTS`` work on both. A body whose
    ``decision.reasons`` is missing or not an array gives no rows.
    """

    table: Any
    code: ColumnElement[Any]
    where: tuple[ColumnElement[bool], ...]

    @classmethod
    def of(cls, dialect: str) -> "ReasonItems":
        if dialect == "postgresql":
            safe = literal_column(
                "CASE WHEN json_typeof(audit_entries.body #> '{decision,reasons}') = 'array' "
                "THEN audit_entries.body #> '{decision,reasons}' ELSE '[]'::json END", type_=JSON)
            elements = func.json_array_elements(safe).table_valued("value").alias("reason_items")
            code = elements.c.value.op("->>")("code")
            return cls(elements, code, (func.json_typeof(elements.c.value) == "object",))
        elements = func.json_each(_t.body, "$.decision.reasons").table_valued("value", "type").alias("reason_items")
        return cls(elements, func.json_extract(elements.c.value, "$.code"), (elements.c.type == "object",))


def names_read(request_id: str, dialect: str) -> ColumnElement[bool]:
    """A ``payload_read`` entry's ``request_ids`` hold ``request_id`` (unnested as :class:`ReasonItems` is)."""
    if dialect == "postgresql":
        safe = literal_column(
            "CASE WHEN json_typeof(audit_entries.body -> 'request_ids') = 'array' "
            "THEN audit_entries.body -> 'request_ids' ELSE '[]'::json END", type_=JSON)
        items = func.json_array_elements_text(safe).table_valued("value").alias("read_items")
        return exists(select(literal_column("1")).select_from(items).where(items.c.value == request_id))
    items = func.json_each(_t.body, "$.request_ids").table_valued("value", "type").alias("read_items")
    return exists(select(literal_column("1")).select_from(items)
                  .where(items.c.type == "text", items.c.value == request_id))


def like_pattern(term: str) -> str:
    """``%term%`` for LIKE with ``%``, ``_`` and the escape character escaped."""
    escaped = term.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")
    return f"%{escaped}%"


def json_escaped(term: str) -> str:
    """``term`` as it appears inside a JSON string (quotes, backslashes, control characters escaped)."""
    return json.dumps(term, ensure_ascii=False)[1:-1]


def text_matches(term: str) -> ColumnElement[bool]:
    """The entry's prompt or output text contains ``term`` (LIKE, ASCII case folded).

    Looked for under :data:`TEXT_FIELDS` of the payload and, for entries of
    chain format 1, of the body: never the payload as a whole, whose random
    ``salt`` would match almost any short hexadecimal term. ``messages`` is
    read as JSON text, in which a quote or a newline is escaped, so the term
    is matched in its JSON-escaped form there; ``prompt`` and ``output`` are
    read as strings.

    Each column is first matched as stored text, which needs no JSON parsing
    (a text found under a key is in the column's text too, in its escaped
    form), so only the rows that pass pay for the JSON paths: a scan takes
    a third of the time (200,000 entries on SQLite: 0.31 s, was 0.98 s).
    Bodies written before the append serialised them (format 1) may hold
    non-ASCII characters as ``\\uXXXX`` escapes, so for a non-ASCII term the
    body is not pre-matched.
    """
    as_json = like_pattern(json_escaped(term))
    as_text = like_pattern(term)
    candidates = []
    for column in (_t.payload, _t.body):
        exact = [cast(column[TEXT_FIELDS[0]], String).ilike(as_json, escape=_ESCAPE)]
        exact += [column[name].as_string().ilike(as_text, escape=_ESCAPE) for name in TEXT_FIELDS[1:]]
        if column is _t.body and not term.isascii():
            candidates.append(or_(*exact))
        else:
            candidates.append(and_(cast(column, String).ilike(as_json, escape=_ESCAPE), or_(*exact)))
    return or_(*candidates)


def _seqs(engine: Engine, where: EntryFilter) -> SeqRange | None:
    """``where``'s time range as a seq range (None: filter on ``created_at``), read in its own short connection."""
    if where.since is None and where.until is None:
        return None
    try:
        with engine.connect() as conn:
            return seq_range(conn, where.since, where.until)
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc


def _page(engine: Engine, where: EntryFilter, newest_first: bool, cursor: int | None, limit: int,
          seqs: SeqRange | None = None) -> Any:
    """The rows of one page: first the page's ``seq`` values, then those rows by primary key.

    Picking the seqs reads only an index when the filter's columns are in
    one, whereas picking whole rows makes the database fetch every candidate
    row before it can sort them: a time range on SQLite read each row of
    the range (the ``created_at`` index is not in ``seq`` order) to keep 51
    of them, 48 ms a page for one day of 100,000 entries and ten times that
    on a million. A time range comes as ``seqs`` (:mod:`audit.time_order`),
    a stretch of the ``(column, seq)`` index or of the primary key, so the
    page reads its own entries only (docs/architecture.md, "The indexes,
    chosen by measurement"). The filter's JSON conditions stay in the inner
    query, where they name ``audit_entries`` as before.
    """
    hits = _ordered(select(_t.seq), engine, where, newest_first, cursor, seqs).limit(limit).subquery("page")
    stmt = select(audit_table).join(hits, _t.seq == hits.c.seq)
    return stmt.order_by(_t.seq.desc() if newest_first else _t.seq)


def _ordered(stmt: Any, engine: Engine, where: EntryFilter, newest_first: bool, cursor: int | None,
             seqs: SeqRange | None) -> Any:
    stmt = stmt.where(*conditions(where, engine.dialect.name, seqs))
    if cursor is not None:
        if seqs is None and (where.since is not None or where.until is not None):
            # Filtering on created_at itself (a range reaching entries from before audit_0005's ordered
            # stretch): ``seq + 0`` is no index's key, so SQLite's planner picks the page from the
            # created_at index rather than walking ``(column, seq)`` from the cursor. Same rows either way.
            key = _t.seq + 0
        else:
            key = _t.seq
        stmt = stmt.where(key < cursor if newest_first else key > cursor)
    return stmt.order_by(_t.seq.desc() if newest_first else _t.seq)


def _fetch(store: AuditStore, stmt: Any) -> list[AuditEntry]:
    """Whole rows as entries, each labelled with the chain format it was hashed in."""
    engine = store.engine
    try:
        with engine.connect() as conn:
            try:
                rows = conn.execute(stmt).mappings().all()
            except (ValueError, TypeError) as exc:
                raise CorruptEntryError(None, str(exc)) from exc
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc
    if not rows:
        return []
    boundary = store.boundary_seq()
    return [AuditEntry.from_row(row, FORMAT_2 if boundary is not None and row["seq"] > boundary else FORMAT_1)
            for row in rows]
