"""The OpenAPI description of the review API (``/v1/audit``): parameters, bodies, answers and errors.

The review routes read their query string and bodies themselves, strictly
(``gateway/review/params.py``, ``gateway/review/actions.py``: an unknown
or repeated parameter is refused, not ignored), so Litestar sees neither;
the operation classes here declare them, from the same names and limits,
and every answer a route gives: the success bodies from the structs of
:mod:`gateway.api.review_shapes`, the errors in OpenAI's shape.

A parameter's schema admits everything the route accepts (it may admit
more, which the route then refuses with a 400): the schema tests send
values outside it and expect a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Parameter, RequestBody

from audit.aggregates import DEFAULT_GROUPS, GROUPS
from audit.export import CSV_COLUMNS, FORMATS, MEDIA_TYPES
from audit.filters import MAX_TEXT
from audit.kinds import KINDS
from audit.search import DECISIONS, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from audit.tables import NAME_LEN
from gateway import urls
from gateway.api import review_shapes
from gateway.api.openapi import (JSON, UNAUTHORIZED, UNSUPPORTED_CODING, UNSUPPORTED_TRANSFER_CODING, JsonSchema,
                                 error_responses, header, json_schema)
from gateway.review.actions import MAX_NOTE, BODIES

_NAME = {"type": "string", "maxLength": NAME_LEN}
_KIND = "(" + "|".join(sorted(KINDS)) + ")"
_GROUP = "(" + "|".join(GROUPS) + ")"


def _query(name: str, schema: dict[str, Any], description: str, **more: Any) -> Parameter:
    return Parameter(name=name, param_in="query", required=False, schema=JsonSchema(document=schema),
                     description=description, **more)


#: Every query parameter of the review routes, by name (``gateway/review/params.py`` reads them).
PARAMETERS: dict[str, Parameter] = {parameter.name: parameter for parameter in (
    _query("principal", _NAME, "Only this principal's entries. Keys without the `reviewer` or `auditor` role may "
           "name only their own (403 `review_forbidden` otherwise); they see only their own anyway."),
    _query("team", _NAME, "Only this team's entries."),
    _query("model", _NAME, "Only entries about this model."),
    _query("request_id", _NAME, "Only the entries of this request id."),
    _query("since", _NAME, "First moment included: an ISO-8601 date (midnight UTC) or date-time (UTC unless it "
           "names an offset; write `Z`, as `+` in a URL is a space).",
           examples={"date": {"value": "2026-05-01"}, "moment": {"value": "2026-05-01T12:00:00Z"}}),
    _query("until", _NAME, "First moment no longer included (as `since`; it must be later than `since`).",
           examples={"date": {"value": "2099-01-01"}}),
    _query("kind", {"type": "array", "items": {"type": "string", "pattern": f"^{_KIND}(,{_KIND})*$"}},
           "Only entries of these kinds: repeat the parameter, or separate kinds with commas.",
           style="form", explode=True),
    _query("decision", {"type": "string", "enum": list(DECISIONS)},
           "Only request entries decided so: `allow`, `deny` (by the policy) or `unavailable` (no decision could "
           "be had)."),
    _query("reason", _NAME, "Only request entries whose decision lists this reason code."),
    _query("read_of", _NAME, "Only the `payload_read` entries that read this request id's texts (who read "
           "them, when)."),
    _query("q", {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
           "Only entries whose prompt or output contains this text (ASCII case-insensitive, matched against the "
           "stored JSON text). The search is recorded as a `payload_read` entry first (never the term itself)."),
    _query("order", {"type": "string", "enum": ["newest", "oldest"], "default": "newest"},
           "`newest` first (the default) or `oldest` first."),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
           "Entries per page."),
    _query("cursor", {"type": "string", "pattern": "^[0-9]{1,18}$"},
           "The `next_cursor` of the page before (keyset pages on `seq`: paging while entries are appended never "
           "repeats or skips one)."),
    _query("include_text", {"type": "boolean", "default": False},
           "Show the texts of prompts and outputs; recorded as a `payload_read` entry before they are shown "
           "(503 `audit_unavailable`, showing nothing, if it cannot be)."),
    _query("format", {"type": "string", "enum": list(FORMATS), "default": "jsonl"},
           "`jsonl` (one entry document per line) or `csv`."),
    _query("group_by", {"type": "string", "pattern": f"^{_GROUP}(,{_GROUP}){{0,{len(GROUPS) - 1}}}$"},
           f"Distinct names among {', '.join(GROUPS)}, comma-separated (default `{','.join(DEFAULT_GROUPS)}`)."),
)}

#: The path's request id (an id longer than a column holds is answered as one that does not exist).
_REQUEST_ID = Parameter(name="request_id", param_in="path", required=True,
                        schema=JsonSchema(document={"type": "string", "minLength": 1, "maxLength": NAME_LEN}),
                        description="A request id, as completion responses name it in `X-Govgate-Request-Id`.")


def _with_path(parameters: list[Any] | None) -> list[Any]:
    """Litestar's parameters with the request id's replaced by :data:`_REQUEST_ID`."""
    return [_REQUEST_ID if getattr(p, "name", None) == "request_id" else p for p in parameters or []]


_FILTERS = ("principal", "team", "model", "request_id", "since", "until")
_SEARCH = (*_FILTERS, "kind", "decision", "reason", "read_of", "q", "order")
#: The query parameters of each route (``tests/gateway/test_openapi_document.py`` holds them to params.py's).
ENTRIES_QUERY = (*_SEARCH, "limit", "cursor", "include_text")
EXPORT_QUERY = (*_SEARCH, "format", "include_text")
USAGE_QUERY = (*_FILTERS, "group_by")
STORY_QUERY = ("include_text",)

_READ_ID = header("The `payload_read` entry that recorded this read of texts (only when texts were shown or "
                  "searched).", {"type": "string", "minLength": 1}, required=False)
_NO_STORE = header("`no-store`: the answer may hold prompts and outputs, which no cache may keep.",
                   {"type": "string", "const": "no-store"})
_ACTION_ID = header("The request the action was recorded under (its own id).", {"type": "string", "minLength": 1})

_BAD_QUERY = ("`invalid_filter` (a date that does not parse, `until` not after `since`, an unknown kind, "
              "`limit` out of range, a cursor that is not one, a repeated parameter, a NUL character or an "
              "overlong value; `param` names it) or `unsupported_parameter` (a parameter this route does not "
              "take).", {})
_UNAVAILABLE = ("`audit_unavailable`: the audit store cannot be read, or the read (or the action) cannot be "
                "recorded, so nothing is shown; `auth_unavailable`: API keys cannot be checked.", {})
_READ_ERRORS = {400: _BAD_QUERY, 401: UNAUTHORIZED,
                403: ("`review_forbidden`: another principal's entries asked for by a key without the "
                      "`reviewer` or `auditor` role.", {}),
                503: _UNAVAILABLE}
_STORY_ERRORS = {400: _BAD_QUERY, 401: UNAUTHORIZED,
                 404: ("`request_not_found`: no entries of this request id that this key may read (another "
                       "user's request is answered alike).", {}),
                 503: _UNAVAILABLE}
_ACTION_ERRORS = {400: ("`invalid_json` (the body is not a JSON object) or `unsupported_parameter` (an unknown "
                        "field).", {}),
                  401: UNAUTHORIZED,
                  403: ("`review_forbidden`: only keys with the `reviewer` role act on requests, and a "
                        "disposition needs a reviewer other than the request's own principal.", {}),
                  404: _STORY_ERRORS[404],
                  413: ("`body_too_large`: the body is over GOVGATE_MAX_BODY_BYTES.", {}),
                  415: UNSUPPORTED_CODING, 501: UNSUPPORTED_TRANSFER_CODING,
                  422: (f"`invalid_value`: a missing field, a wrong type, a note empty or over {MAX_NOTE} "
                        "characters, a NUL character (`param` names the field).", {}),
                  503: _UNAVAILABLE}


def _json(kind: type) -> dict[str, OpenAPIMediaType]:
    return {JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(kind)))}


def _read_operation(names: tuple[str, ...], responses: dict[str, OpenAPIResponse]) -> type[Operation]:
    """An ``Operation`` class for a read route: its query parameters and answers (after the path's own)."""

    @dataclass
    class ReadOperation(Operation):
        def __post_init__(self) -> None:
            self.parameters = [*_with_path(self.parameters), *(PARAMETERS[name] for name in names)]
            self.responses = responses

    return ReadOperation


def _action_operation(action: str, description: str) -> type[Operation]:
    """An ``Operation`` class for one review action: its body (the struct it is read into) and answers."""
    body = BODIES[action]
    required = bool(json_schema(body).get("required"))  # a flag needs no body

    @dataclass
    class ActionOperation(Operation):
        def __post_init__(self) -> None:
            self.parameters = _with_path(self.parameters)
            self.request_body = RequestBody(required=required, content=_json(body), description=(
                f"{description} Read strictly: an unknown field is refused with 400 `unsupported_parameter`."
                + ("" if required else " The body may be left out.")))
            self.responses = {
                "201": OpenAPIResponse(description="The review entry appended to the chain, under the request's id.",
                                       headers={urls.REQUEST_ID_HEADER: _ACTION_ID, "Cache-Control": _NO_STORE},
                                       content=_json(review_shapes.AuditEntryDocument)),
                **error_responses(_ACTION_ERRORS)}

    return ActionOperation


ENTRIES_OPERATION = _read_operation(ENTRIES_QUERY, {
    "200": OpenAPIResponse(description="A page of entries.",
                           headers={urls.REQUEST_ID_HEADER: _READ_ID, "Cache-Control": _NO_STORE},
                           content=_json(review_shapes.AuditEntryList)),
    **error_responses(_READ_ERRORS)})
STORY_OPERATION = _read_operation(STORY_QUERY, {
    "200": OpenAPIResponse(description="The request's story.",
                           headers={urls.REQUEST_ID_HEADER: _READ_ID, "Cache-Control": _NO_STORE},
                           content=_json(review_shapes.AuditRequestStory)),
    **error_responses(_STORY_ERRORS)})
USAGE_OPERATION = _read_operation(USAGE_QUERY, {
    "200": OpenAPIResponse(description="Requests, tokens and denials per group.",
                           headers={"Cache-Control": _NO_STORE}, content=_json(review_shapes.AuditUsage)),
    **error_responses(_READ_ERRORS)})
EXPORT_OPERATION = _read_operation(EXPORT_QUERY, {
    "200": OpenAPIResponse(
        description=("Every matching entry, streamed: JSONL, one entry document per line (the schema of the "
                     "list of lines), or CSV with a header row, columns " + ", ".join(CSV_COLUMNS) + " (`body`, "
                     "`payload` and `withheld` as JSON text; a cell starting with `=`, `+`, `-`, `@`, `'`, a tab "
                     "or a carriage return has one `'` put in front, so spreadsheets show it as text)."),
        headers={urls.REQUEST_ID_HEADER: _READ_ID, "Cache-Control": _NO_STORE,
                 "Content-Disposition": header("`attachment; filename=\"audit.jsonl\"` (or `.csv`).",
                                               {"type": "string"})},
        content={MEDIA_TYPES["jsonl"]: OpenAPIMediaType(schema=JsonSchema(document={
                     "type": "array", "items": json_schema(review_shapes.AuditEntryDocument)})),
                 "text/csv": OpenAPIMediaType(schema=JsonSchema(document={"type": "string"}))}),
    **error_responses(_READ_ERRORS)})
FLAG_OPERATION = _action_operation("flag", "Flag the request for attention, optionally saying why.")
COMMENT_OPERATION = _action_operation("comment", "A reviewer's note on the request.")
DISPOSITION_OPERATION = _action_operation("disposition", "The reviewer's verdict on the request.")
