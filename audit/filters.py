"""Filter values as people write them, turned into an :class:`audit.search.EntryFilter`, in one place.

The review API reads them from a query string (``gateway/review/params.py``)
and ``govgate audit export`` from its options (``govgate/cli_audit_export.py``);
both hand the text over to :func:`entry_filter`, so a filter means the same,
and a value is refused for the same reason, wherever it is given. A refused
value is a :class:`FilterError` naming the filter by its public name (the
query parameter); each caller turns it into its own kind of error (a 400
``invalid_filter``, a command-line error).

Values no database should see are refused here too: a NUL character (which
PostgreSQL refuses in text) and a value longer than any column holds (it
could never match, and would only make the query slow).
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from typing import Any, Final, Iterable

from .kinds import KINDS
from .search import DECISIONS, EntryFilter
from .tables import NAME_LEN

#: The longest free-text search term (``q``).
MAX_TEXT: Final = 1000
#: The filters :func:`entry_filter` takes, by their public names.
FILTERS: Final = ("principal", "team", "model", "request_id", "kind", "decision", "reason", "read_of", "since",
                  "until", "q")


class FilterError(ValueError):
    """A filter value that cannot be used; ``param`` is the filter's public name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def checked(param: str, value: str, longest: int = NAME_LEN) -> str:
    """``value`` if it holds no NUL and at most ``longest`` characters."""
    if "\x00" in value or len(value) > longest:
        raise FilterError(param, f"{param} must be at most {longest} characters, without NUL.")
    return value


def parse_time(param: str, value: str) -> datetime:
    """An ISO-8601 date (midnight UTC) or date-time (UTC when it names no offset), as an aware UTC datetime."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(0), tzinfo=timezone.utc)
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None or moment.utcoffset() is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)  # OverflowError at the ends of the calendar (year 1 +05:00)
    except (ValueError, OverflowError):
        raise FilterError(param, f"{param} must be an ISO-8601 date (2026-05-01) or date-time "
                                 "(2026-05-01T12:00:00Z) within years 1 to 9999 in UTC.") from None


def parse_kinds(values: Iterable[str]) -> frozenset[str]:
    """Kinds given repeatedly and/or comma-separated (``request,completion``); every one must exist."""
    kinds: set[str] = set()
    for item in values:
        for kind in checked("kind", item).split(","):
            if kind not in KINDS:
                raise FilterError("kind", f"Unknown kind {shown(kind)}; kinds are {', '.join(sorted(KINDS))}.")
            kinds.add(kind)
    return frozenset(kinds)


def entry_filter(*, principal: str | None = None, team: str | None = None, model: str | None = None,
                 request_id: str | None = None, kind: Iterable[str] = (), decision: str | None = None,
                 reason: str | None = None, read_of: str | None = None, since: str | None = None,
                 until: str | None = None, q: str | None = None) -> EntryFilter:
    """The filter these values ask for (``None``: not filtered on); :class:`FilterError` for a bad one.

    ``since`` is inclusive and ``until`` exclusive (see :func:`parse_time`);
    ``kind`` may be given several times and comma-separated; ``q`` is free
    text of 1 to :data:`MAX_TEXT` characters.
    """
    names = {"principal": principal, "team": team, "model": model, "request_id": request_id, "reason": reason,
             "read_of": read_of}
    plain = {name: checked(name, value) if value is not None else None for name, value in names.items()}
    if decision is not None and decision not in DECISIONS:
        raise FilterError("decision", f"decision must be one of {', '.join(DECISIONS)}.")
    if q is not None and not checked("q", q, MAX_TEXT):
        raise FilterError("q", f"q must be 1 to {MAX_TEXT} characters.")
    start = parse_time("since", checked("since", since)) if since is not None else None
    end = parse_time("until", checked("until", until)) if until is not None else None
    if start is not None and end is not None and start >= end:
        raise FilterError("until", "until must be later than since (since is inclusive, until exclusive).")
    return EntryFilter(kinds=parse_kinds(kind), decision=decision, since=start, until=end,  # type: ignore[arg-type]
                       text=q, **plain)


def filter_document(where: EntryFilter) -> dict[str, Any]:
    """What a filter covered, for the ``payload_read`` entry of an export (the search term itself is not kept)."""
    return {"principal": where.principal, "team": where.team, "model": where.model,
            "request_id": where.request_id, "kinds": sorted(where.kinds), "decision": where.decision,
            "reason": where.reason, "read_of": where.read_of,
            "since": where.since.isoformat() if where.since else None,
            "until": where.until.isoformat() if where.until else None}


def shown(value: str) -> str:
    """A caller's value quoted for an error message, cut short."""
    return repr(value[:64])
