"""Query parameters of the review API, read strictly: a bad filter is a 400 naming it, never ignored.

An ignored filter would answer a narrower question with a wider answer (a
typo in ``decison=deny`` returning every entry), so unknown and repeated
parameters are refused like bad values. What the filters' values mean, and
which values are refused (a bad date, a NUL character, which PostgreSQL
refuses in text), is decided by ``audit/filters.py``, which ``govgate audit
export`` uses too; a value it refuses is a 400 ``invalid_filter`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Mapping, Sequence

from audit.aggregates import DEFAULT_GROUPS, GROUPS
from audit.export import FORMATS
from audit.filters import MAX_TEXT, FilterError, checked, entry_filter, shown
from audit.search import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, EntryFilter
from audit.tables import NAME_LEN
from gateway.api_errors import ApiError
from gateway.query_flags import FLAG_SPELLINGS, read_flag

#: The code of every refused parameter.
INVALID_FILTER: Final = "invalid_filter"

_FILTERS: Final = ("principal", "team", "model", "request_id", "since", "until")
ENTRY_PARAMS: Final = frozenset({*_FILTERS, "kind", "decision", "reason", "read_of", "q", "order", "limit",
                                 "cursor", "include_text"})
USAGE_PARAMS: Final = frozenset({*_FILTERS, "group_by"})
EXPORT_PARAMS: Final = frozenset({*_FILTERS, "kind", "decision", "reason", "read_of", "q", "order", "format",
                                  "include_text"})
STORY_PARAMS: Final = frozenset({"include_text"})

Query = Mapping[str, Sequence[str]]


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, INVALID_FILTER, message, param=param)


@dataclass(frozen=True)
class EntryQuery:
    """A search or an export as asked: the filter, the order, the page and whether texts are wanted."""

    where: EntryFilter
    newest_first: bool
    limit: int
    cursor: int | None
    include_text: bool
    fmt: str


def entry_query(query: Query, *, allowed: frozenset[str] = ENTRY_PARAMS) -> EntryQuery:
    """``GET …/entries`` (and, with ``allowed=EXPORT_PARAMS``, ``GET …/export``)."""
    values = _single(query, allowed, repeatable=("kind",))
    where = _filter(values, kind=query.get("kind", ()), decision=values.get("decision"),
                    reason=values.get("reason"), read_of=values.get("read_of"), q=values.get("q"))
    order = values.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise bad("order", "order must be 'newest' (the default) or 'oldest'.")
    fmt = values.get("format", "jsonl")
    if fmt not in FORMATS:
        raise bad("format", f"format must be one of {', '.join(FORMATS)}.")
    return EntryQuery(where=where, newest_first=order == "newest", limit=_limit(values.get("limit")),
                      cursor=_cursor(values.get("cursor")), include_text=flag(values, "include_text"), fmt=fmt)


def usage_query(query: Query) -> tuple[EntryFilter, tuple[str, ...]]:
    """``GET …/usage``: the filter and the groups."""
    values = _single(query, USAGE_PARAMS)
    where = _filter(values)
    groups: tuple[str, ...] = DEFAULT_GROUPS
    if "group_by" in values:
        groups = tuple(values["group_by"].split(","))  # an empty name ("day,,team") is a typo: refused
        if any(name not in GROUPS for name in groups) or len(set(groups)) != len(groups):
            raise bad("group_by", f"group_by must be distinct names among {', '.join(GROUPS)}, comma-separated.")
    return where, groups


def action_query(query: Query) -> None:
    """``POST …/requests/{id}/{action}``: takes no parameter (its fields are in the body)."""
    for name in sorted(query):
        raise ApiError(400, "unsupported_parameter", f"Unknown parameter {shown(name)}; a review action takes "
                       "no query parameter (its fields go in the JSON body).", param=name[:64])


def story_query(query: Query) -> bool:
    """``GET …/requests/{id}``: whether the texts are wanted."""
    return flag(_single(query, STORY_PARAMS), "include_text")


def flag(values: Mapping[str, str], name: str) -> bool:
    value = read_flag(values.get(name, "false"))
    if value is None:
        raise bad(name, f"{name} must be {FLAG_SPELLINGS}.")
    return value


def _filter(values: Mapping[str, str], **more: Any) -> EntryFilter:
    """The filter of the common parameters and ``more`` (``audit/filters.py`` reads them all)."""
    try:
        return entry_filter(**{name: values.get(name) for name in _FILTERS}, **more)
    except FilterError as exc:
        raise bad(exc.param, exc.message) from None


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE_SIZE
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_PAGE_SIZE:
        raise bad("limit", f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}.")
    return int(value)


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise bad("cursor", "cursor must be the next_cursor of an earlier page.")
    return int(value)


def _single(query: Query, allowed: frozenset[str], repeatable: tuple[str, ...] = ()) -> dict[str, str]:
    """Each parameter's one value, after refusing unknown, repeated, overlong and NUL-holding ones."""
    values: dict[str, str] = {}
    for name in sorted(query):
        if name not in allowed:
            raise ApiError(400, "unsupported_parameter", f"Unknown parameter {shown(name)}; this endpoint takes "
                           f"{', '.join(sorted(allowed))}.", param=name[:64])
        given = list(query[name])
        if len(given) > 1 and name not in repeatable:
            raise bad(name, f"{name} may be given once.")
        for value in given:
            try:
                checked(name, value, MAX_TEXT if name == "q" else NAME_LEN)
            except FilterError as exc:
                raise bad(exc.param, exc.message) from None
        values[name] = given[-1]
    return values

