"""Usage aggregates from the audit trail: requests, tokens and denials per team, model, day (and principal).

One ``GROUP BY`` query each, over what the entries already hold: a
``request`` entry's ``decision.allow`` (and ``decision.unavailable`` for a
refusal without a decision), a terminal entry's ``usage`` token counts, and
the decision's reason codes. Tokens are counted on the day their terminal
entry was written. The day is the UTC date of ``created_at``, spelt per
dialect (SQLite stores the time as ``YYYY-MM-DD HH:MM:SS.ffffff`` text,
PostgreSQL as ``timestamptz``); everything else is portable SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Iterable, Sequence

from sqlalchemy import Engine, and_, case, func, literal, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from .db import DB_ERRORS, describe, reason
from .errors import AuditError
from .kinds import REJECTED, REQUEST, TERMINAL_KINDS
from .search import (EntryFilter, ReasonItems, admission_code, answered_as_unknown, conditions, decision_is,
                     not_admitted)
from .tables import audit_table

_t = audit_table.c

#: What usage may be grouped by, in the order the groups are listed.
GROUPS: Final = ("day", "team", "model", "principal")
DEFAULT_GROUPS: Final = ("day", "team", "model")
#: The most groups one answer holds (a month of days × teams × models stays well under it).
MAX_GROUPS: Final = 10_000


@dataclass(frozen=True)
class Usage:
    """The answer: one row per group with its counts, and the denials per group and reason code."""

    groups: tuple[str, ...]
    rows: list[dict[str, Any]]
    denials: list[dict[str, Any]]
    truncated: bool


def day_of(dialect: str) -> ColumnElement[str]:
    """``created_at``'s UTC date as ``YYYY-MM-DD`` text."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", _t.created_at), "YYYY-MM-DD")
    return func.substr(_t.created_at, 1, 10)


def usage(engine: Engine, where: EntryFilter, groups: Sequence[str] = DEFAULT_GROUPS) -> Usage:
    """Requests (allowed, denied, unavailable, rejected) and tokens per group, and denials by reason.

    ``where`` narrows the entries as for a search (principal, team, model,
    time range); its ``kinds``, ``decision``, ``reason`` and ``text`` must be
    unset, since usage is counted over every kind that carries it. With its
    ``as_answered``, a request entry answered as an unknown model counts as
    the rejection of an unknown name would: ``rejected``, in no model's
    group, with no denial.
    """
    if where.kinds or where.decision or where.reason or where.text:
        raise ValueError("usage is filtered by principal, team, model, request id and time only")
    unknown = [name for name in groups if name not in GROUPS]
    if unknown or len(set(groups)) != len(groups):
        raise ValueError(f"groups must be distinct names among {', '.join(GROUPS)}")
    dialect = engine.dialect.name
    keys = _group_columns(groups, dialect, where.as_answered)
    base = conditions(where, dialect)

    # Usage counts most kinds, so ``kind`` never narrows it: spelt ``kind || ''``, no index keys on it, and
    # SQLite's planner (without statistics) reads the time range's ``created_at`` index instead of walking
    # ``(kind, seq)`` over the whole store (one day of a million entries: 6.7 s before, bench/audit.py).
    kind = _t.kind.concat("")
    # One pass grouped by (groups, kind, verdict), folded into one row per group here: each row's
    # JSON is read once per value (a sum per column would read the decision three times).
    terminal = _t.kind.in_(sorted(TERMINAL_KINDS))
    allow = _t.body[("decision", "allow")].as_boolean()
    unavailable = _t.body[("decision", "unavailable")].as_boolean()
    refused = not_admitted()  # allowed by the policy, refused at its reservation (a limit, the queue, the context)
    shown_kind = case((answered_as_unknown(), literal(REJECTED)), else_=_t.kind) if where.as_answered else _t.kind
    verdict = case((shown_kind != REQUEST, None),
                   (and_(allow == true(), refused, admission_code() == USAGE_UNAVAILABLE), "unavailable"),
                   (and_(allow == true(), refused), "denied"), (allow == true(), "allowed"),
                   (unavailable == true(), "unavailable"), else_="denied").label("verdict")

    def tokens(name: str) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((terminal, _t.body[("usage", name)].as_integer()))), 0).label(name)

    shown_kind = shown_kind.label("kind")
    totals = (select(*keys, shown_kind, verdict, func.count().label("entries"),
                     *(tokens(name) for name in _TOKENS))
              .where(*base, kind.in_(sorted({REQUEST, REJECTED} | TERMINAL_KINDS)))
              .group_by(*keys, shown_kind, verdict).order_by(*_nulls_first(keys), shown_kind)
              .limit(_PARTS_PER_GROUP * (MAX_GROUPS + 1)))
    is_request = and_(kind == REQUEST, not_(answered_as_unknown())) if where.as_answered else kind == REQUEST
    items = ReasonItems.of(dialect)
    denials = (select(*keys, items.code.label("reason"), func.count().label("count"))
               .select_from(audit_table).join(items.table, true())
               .where(*base, *items.where, is_request, or_(decision_is("deny"), decision_is("unavailable")))
               .group_by(*keys, items.code).order_by(*_nulls_first(keys), items.code).limit(MAX_GROUPS + 1))
    # Refusals after an allow (the atomic reservation's: a limit the policy's snapshot did not see reached,
    # the queue full, the context): by their admission's code (probe s59 H2: counted as allowed, in no denial).
    code = admission_code()
    after_allow = (select(*keys, code.label("reason"), func.count().label("count"))
                   .where(*base, is_request, _t.body[("decision", "allow")].as_boolean() == true(), not_admitted(),
                          code.is_not(None), code != USAGE_UNAVAILABLE)
                   .group_by(*keys, code).order_by(*_nulls_first(keys), code).limit(MAX_GROUPS + 1))
    try:
        with engine.connect() as conn:
            parts = conn.execute(totals).mappings().all()
            rows = _fold(groups, parts)
            denied = _merged(groups, [_ints(dict(row)) for row in conn.execute(denials).mappings()],
                             [_ints(dict(row)) for row in conn.execute(after_allow).mappings()])
    except DB_ERRORS as exc:
        raise AuditError(f"audit read failed on {describe(engine)}: {reason(exc)}") from exc
    # Whole groups come first (ordered by group), so the first MAX_GROUPS rows are complete.
    truncated = len(rows) > MAX_GROUPS or len(parts) == _PARTS_PER_GROUP * (MAX_GROUPS + 1) \
        or len(denied) > MAX_GROUPS
    return Usage(tuple(groups), rows[:MAX_GROUPS], denied[:MAX_GROUPS], truncated)


#: An admission's code when the counters could not be asked: counted as ``unavailable``, not a denial.
USAGE_UNAVAILABLE: Final = "usage_unavailable"


def _merged(groups: Sequence[str], *lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Denials per (group, reason) from several queries, counts added, in the groups' then reasons' order."""
    counts: dict[tuple[Any, ...], int] = {}
    for rows in lists:
        for row in rows:
            key = (*(row[name] for name in groups), row["reason"])
            counts[key] = counts.get(key, 0) + int(row["count"])
    order = sorted(counts, key=lambda k: tuple((v is not None, v or "") for v in k))
    return [{**dict(zip(groups, key[:-1])), "reason": key[-1], "count": counts[key]} for key in order]


def _group_columns(groups: Iterable[str], dialect: str, as_answered: bool = False) -> list[ColumnElement[Any]]:
    """The group keys; with ``as_answered`` a request answered as an unknown model is in no model's group."""
    model: ColumnElement[Any] = _t.model
    if as_answered:
        model = case((answered_as_unknown(), None), else_=_t.model)
    columns = {"day": day_of(dialect), "team": _t.team, "model": model, "principal": _t.principal}
    return [columns[name].label(name) for name in groups]


#: At most this many (kind, verdict) parts per group: rejected, three verdicts, four terminal kinds.
_PARTS_PER_GROUP: Final = 8
_TOKENS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")
_COUNTS: Final = ("requests", "allowed", "denied", "unavailable", "rejected")


def _fold(groups: Sequence[str], parts: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per group from its (kind, verdict) parts, in the groups' order (NULLs first)."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for part in parts:
        key = tuple(part[name] for name in groups)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {**dict(zip(groups, key)), **dict.fromkeys(_COUNTS + _TOKENS, 0)}
        if part["kind"] == REQUEST:
            row["requests"] += int(part["entries"])
            row[part["verdict"]] += int(part["entries"])
        elif part["kind"] == REJECTED:
            row["rejected"] += int(part["entries"])
        for name in _TOKENS:
            row[name] += int(part[name])
    return [rows[key] for key in sorted(rows, key=lambda k: tuple((v is not None, v or "") for v in k))]


def _nulls_first(keys: list[ColumnElement[Any]]) -> list[ColumnElement[Any]]:
    """One order on both databases (PostgreSQL puts NULLs last by default, SQLite first)."""
    return [key.asc().nulls_first() for key in keys]


def _ints(row: dict[str, Any]) -> dict[str, Any]:
    """Sums come back as Decimal on PostgreSQL: JSON wants plain integers."""
    return {key: int(value) if key not in GROUPS and key != "reason" and value is not None else value
            for key, value in row.items()}
