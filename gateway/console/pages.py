"""The console's pages (GET): review queue, search, one request, usage, chain status.

Thin handlers: each reads its query, calls the review service (the one the
review API calls, with the caller's :class:`gateway.review.access.Access`,
so reads of texts are ``payload_read`` entries exactly as through the API)
and renders a template.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Template

from audit.kinds import DELIVERED, KINDS, REJECTED, REQUEST, REVIEW_KINDS, TERMINAL_KINDS
from audit.search import DECISIONS
from audit.tables import NAME_LEN
from gateway import urls
from gateway.api_errors import ApiError
from gateway.console import charts
from gateway.console.chain_status import STEP, chain_status
from gateway.console.queue import WINDOW, review_queue
from gateway.console.render import echoed, page
from gateway.console.signin import Reviewer
from gateway.console.story_view import story_view
from gateway.review.params import entry_query, usage_query
from gateway.review.service import DISPOSITIONS, ReviewService, request_not_found

#: The search form's fields, in the review API's names (``include_text`` is not offered: the table shows none).
SEARCH_FIELDS = ("q", "principal", "team", "model", "request_id", "kind", "decision", "reason", "read_of", "since",
                 "until", "order", "limit")
USAGE_FIELDS = ("since", "until", "team", "model", "principal")
#: Entries whose request id is a request's (a link to its page); a read's or a key's id is not.
LINKED_KINDS = frozenset({REQUEST, REJECTED, DELIVERED}) | TERMINAL_KINDS | REVIEW_KINDS
#: Rows of the review queue shown at once (the newest).
QUEUE_SHOWN = 200
#: What the request page confirms after an action (``?done=``, set by the action's redirect).
DONE = {"flag": "Flag recorded.", "comment": "Comment recorded.", "disposition": "Disposition recorded."}
#: The usage page's range when none is asked for.
DEFAULT_DAYS = 30


def service(state: State) -> ReviewService:
    return ReviewService(state.components.audit)


def form_values(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    """The filled-in fields of a GET form (an empty field means "not filtered on")."""
    return {name: value for name, value in request.query_params.items() if name in names and value != ""}


def refused(request: Request, names: tuple[str, ...]) -> None:
    """A parameter the page does not take is a 400 (as in the API), not silently dropped; so is one given twice
    (which of the two would count is a guess: the API refuses it too). ``names`` are all it takes: the search's
    ``cursor`` was let through on every page until 2026-12-06."""
    for name in request.query_params:
        if name not in names:
            raise ApiError(400, "unsupported_parameter", f"Unknown parameter {name[:64]!r} for this page.",
                           param=name[:64])
        if len(request.query_params.getall(name)) > 1:
            raise ApiError(400, "invalid_filter", f"{name} may be given once.", param=name)


def checked_request_id(request_id: str) -> str:
    if not request_id or len(request_id) > NAME_LEN or "\x00" in request_id:
        raise request_not_found(request_id)
    return request_id


class ConsolePages(Controller):
    """Every page here needs a signed-in reviewer or auditor (the ``reviewer`` dependency)."""

    @get(urls.CONSOLE_QUEUE.removeprefix(urls.CONSOLE), name="console-queue")
    async def queue(self, request: Request, state: State, reviewer: NamedDependency[Reviewer]) -> Template:
        refused(request, ())
        found = await review_queue(service(state), reviewer.access)
        return page("queue.html", user=reviewer, active=urls.CONSOLE_QUEUE, queue=found, window=WINDOW,
                    shown=QUEUE_SHOWN)

    @get(urls.CONSOLE_SEARCH.removeprefix(urls.CONSOLE), name="console-search")
    async def search(self, request: Request, state: State, reviewer: NamedDependency[Reviewer]) -> Template:
        refused(request, (*SEARCH_FIELDS, "cursor"))  # the cursor: its pager's links
        values = form_values(request, SEARCH_FIELDS)
        context: dict[str, Any] = {"user": reviewer, "active": urls.CONSOLE_SEARCH, "values": echoed(values),
                                   "kinds": sorted(KINDS), "decisions": DECISIONS, "linked": LINKED_KINDS, "results": None, "error": None}
        if values or "cursor" in request.query_params:
            params = {name: [value] for name, value in values.items()}
            if "cursor" in request.query_params:
                params["cursor"] = [request.query_params["cursor"]]
            try:
                query = entry_query(params)
            except ApiError as exc:
                return page("search.html", status=exc.status, **{**context, "error": exc})
            answer = (await service(state).search(reviewer.access, query)).body
            context["results"] = answer
            if answer["next_cursor"]:
                context["next_page"] = f"?{urlencode({**values, 'cursor': answer['next_cursor']})}"
            if "cursor" in request.query_params:
                context["first_page"] = f"?{urlencode(values)}"
        return page("search.html", **context)

    @get(urls.CONSOLE_REQUEST.removeprefix(urls.CONSOLE), name="console-request")
    async def request_page(self, request: Request, state: State, reviewer: NamedDependency[Reviewer],
                           request_id: FromPath[str]) -> Template:
        refused(request, ("done",))
        done = DONE.get(request.query_params.get("done", ""))
        answer = await service(state).story(reviewer.access, checked_request_id(request_id), include_text=True)
        return page("request.html", user=reviewer, view=story_view(answer.body), dispositions=DISPOSITIONS,
                    read_id=answer.request_id, done=done)

    @get(urls.CONSOLE_USAGE.removeprefix(urls.CONSOLE), name="console-usage")
    async def usage(self, request: Request, state: State, reviewer: NamedDependency[Reviewer]) -> Template:
        refused(request, USAGE_FIELDS)
        values = form_values(request, USAGE_FIELDS)
        if "since" not in values and "until" not in values:
            start = datetime.now(timezone.utc).date() - timedelta(days=DEFAULT_DAYS - 1)
            values["since"] = start.isoformat()
        params = {name: [value] for name, value in values.items()}
        # One query grouped by day, team and model (the service's cost is per query); the charts add up the
        # rows of each day and team, or day and model.
        try:
            answer = (await service(state).usage(reviewer.access,
                                                 *usage_query({**params, "group_by": ["day,team,model"]}))).body
        except ApiError as exc:
            if exc.status != 400:
                raise
            # A filter that cannot be read: the form stays, naming the field, as on the search page (until
            # 2026-12-05 a bare error page without the form, probe s54 F6).
            return page("usage.html", status=exc.status, user=reviewer, active=urls.CONSOLE_USAGE,
                        values=echoed(values), error=exc, totals=None, truncated=False, charts=[])
        rows = answer["data"]
        reasons: dict[str, float] = {}
        for row in answer["denials"]:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + row["count"]
        totals = {name: sum(row[name] for row in rows)
                  for name in ("requests", "allowed", "denied", "unavailable", "rejected", "total_tokens")}
        drawn = [(f"{what} per day by {key}", charts.stacked_bars(rows, key, column, unit=what.lower()))
                 for key in ("team", "model") for what, column in (("Requests", "requests"), ("Tokens", "total_tokens"))]
        drawn.append(("Denials by reason", charts.bars(sorted(reasons.items()), unit="denials")))
        return page("usage.html", user=reviewer, active=urls.CONSOLE_USAGE, values=echoed(values), totals=totals,
                    truncated=answer["truncated"], charts=drawn, error=None)

    @get(urls.CONSOLE_CHAIN.removeprefix(urls.CONSOLE), name="console-chain")
    async def chain(self, request: Request, state: State, reviewer: NamedDependency[Reviewer]) -> Template:
        refused(request, ())
        status = await chain_status(state.components.redis, state.components.audit.engine)
        return page("chain.html", user=reviewer, active=urls.CONSOLE_CHAIN, chain=status, step=STEP,
                    now=datetime.now(timezone.utc).timestamp())
