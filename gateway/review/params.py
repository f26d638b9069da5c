"""Query parameters of the review API, read strictly: a bad filter is a 400 naming it, never ignored.

An ignored filter would answer a narrower question with a wider answer (a
typo in ``decison=deny`` returning every entry), so unknown and repeated
parameters are refused like bad values. Values that no database should see
(a NUL character, which PostgreSQL refuses in text) are refused here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Final, Mapping, Sequence

from audit.aggregates import DEFAULT_GROUPS, GROUPS
from audit.export import FORMATS
from audit.kinds import KINDS
from audit.search import DECISIONS, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, EntryFilter
from audit.tables import NAME_LEN
from gateway.api_errors import ApiError

#: The code of every refused parameter.
INVALID_FILTER: Final = "invalid_filter"
#: The longest free-text search term.
MAX_TEXT: Final = 1000

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
    kinds: set[str] = set()
    for item in query.get("kind", ()):
        for kind in item.split(","):
            if kind not in KINDS:
                raise bad("kind", f"Unknown kind {_shown(kind)}; kinds are {', '.join(sorted(KINDS))}.")
            kinds.add(kind)
    decision = values.get("decision")
    if decision is not None and decision not in DECISIONS:
        raise bad("decision", f"decision must be one of {', '.join(DECISIONS)}.")
    text = values.get("q")
    if text is not None and not 1 <= len(text) <= MAX_TEXT:
        raise bad("q", f"q must be 1 to {MAX_TEXT} characters.")
    since, until = _time_range(values)
    where = EntryFilter(principal=values.get("principal"), team=values.get("team"), model=values.get("model"),
                        request_id=values.get("request_id"), kinds=frozenset(kinds), decision=decision,  # type: ignore[arg-type]
                        reason=values.get("reason"), read_of=values.get("read_of"), since=since, until=until,
                        text=text)
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
    since, until = _time_range(values)
    groups: tuple[str, ...] = DEFAULT_GROUPS
    if "group_by" in values:
        groups = tuple(name for name in values["group_by"].split(",") if name)
        if not groups or any(name not in GROUPS for name in groups) or len(set(groups)) != len(groups):
            raise bad("group_by", f"group_by must be distinct names among {', '.join(GROUPS)}, comma-separated.")
    return EntryFilter(principal=values.get("principal"), team=values.get("team"), model=values.get("model"),
                       request_id=values.get("request_id"), since=since, until=until), groups


def story_query(query: Query) -> bool:
    """``GET …/requests/{id}``: whether the texts are wanted."""
    return flag(_single(query, STORY_PARAMS), "include_text")


def flag(values: Mapping[str, str], name: str) -> bool:
    value = values.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise bad(name, f"{name} must be true or false.")
    return value in ("true", "1")


def parse_time(param: str, value: str) -> datetime:
    """An ISO-8601 date (midnight UTC) or date-time (UTC when it names no offset)."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(0), tzinfo=timezone.utc)
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None or moment.utcoffset() is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)  # OverflowError at the ends of the calendar (year 1 +05:00)
    except (ValueError, OverflowError):
        raise bad(param, f"{param} must be an ISO-8601 date (2026-05-01) or date-time "
                         "(2026-05-01T12:00:00Z) within years 1 to 9999 in UTC.") from None


def _time_range(values: Mapping[str, str]) -> tuple[datetime | None, datetime | None]:
    since = parse_time("since", values["since"]) if "since" in values else None
    until = parse_time("until", values["until"]) if "until" in values else None
    if since is not None and until is not None and since >= until:
        raise bad("until", "until must be later than since (since is inclusive, until exclusive).")
    return since, until


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
            raise ApiError(400, "unsupported_parameter", f"Unknown parameter {_shown(name)}; this endpoint takes "
                           f"{', '.join(sorted(allowed))}.", param=name[:64])
        given = list(query[name])
        if len(given) > 1 and name not in repeatable:
            raise bad(name, f"{name} may be given once.")
        longest = MAX_TEXT if name == "q" else NAME_LEN
        for value in given:
            if "\x00" in value or len(value) > longest:
                raise bad(name, f"{name} must be at most {longest} characters, without NUL.")
        values[name] = given[-1]
    return values


def _shown(value: str) -> str:
    """A caller's value quoted for an error message, cut short."""
    return repr(value[:64])
