"""The review API under ``/v1/audit``: search, a request's story, usage, review actions, export (thin).

Routes read their query strictly (``gateway/review/params.py``) and hand
over to :class:`gateway.review.service.ReviewService`; access is decided by
the caller's roles (``gateway/review/access.py``). There is deliberately no
PUT, PATCH or DELETE anywhere under this path: entries are appended, never
changed. Since Litestar sees neither the query nor the bodies, their
description (parameters, bodies, answers, errors) comes from
``gateway/api/review_openapi.py``.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from audit.export import MEDIA_TYPES
from audit.tables import NAME_LEN
from gateway import urls
from gateway.api.openapi import SECURITY
from gateway.api.review_openapi import (COMMENT_OPERATION, DISPOSITION_OPERATION, ENTRIES_OPERATION,
                                        EXPORT_OPERATION, FLAG_OPERATION, STORY_OPERATION, USAGE_OPERATION)
from gateway.api.bodies import read_body
from gateway.auth import Principal
from gateway.review.access import Access
from gateway.review.actions import parse_action
from gateway.review.params import EXPORT_PARAMS, action_query, entry_query, story_query, usage_query
from gateway.review.service import Answer, ReviewService, request_not_found

_STORY_PATH = "/requests/{request_id:str}"


def _service(state: State) -> ReviewService:
    return ReviewService(state.components.audit)


def _query(request: Request) -> dict[str, list[str]]:
    return {name: list(values) for name, values in request.query_params.dict().items()}


def _checked(request_id: str) -> str:
    if not request_id or len(request_id) > NAME_LEN or "\x00" in request_id:
        raise request_not_found(request_id)
    return request_id


#: Every answer of the review API may hold prompts and outputs (``include_text``, an export, a search
#: by ``q``) or what the log says of them: no cache (a proxy's, a browser's disk cache) may keep one,
#: as the console's pages (``gateway/console/render.py``) and a new key's secret say.
NO_STORE = {"Cache-Control": "no-store"}


def _respond(answer: Answer, status: int = 200) -> Response[dict[str, Any]]:
    headers = {**NO_STORE, urls.REQUEST_ID_HEADER: answer.request_id} if answer.request_id else dict(NO_STORE)
    return Response(answer.body, status_code=status, headers=headers)


class ReviewController(Controller):
    path = urls.AUDIT
    tags = ["audit"]
    security = SECURITY

    @get("/entries", summary="Search audit entries", operation_id="listAuditEntries",
         operation_class=ENTRIES_OPERATION)
    async def entries(self, request: Request, state: State,
                      principal: NamedDependency[Principal]) -> Response[dict[str, Any]]:
        query = entry_query(_query(request))
        return _respond(await _service(state).search(Access(principal), query))

    @get(_STORY_PATH, summary="One request's whole story", operation_id="retrieveAuditRequest",
         operation_class=STORY_OPERATION)
    async def story(self, request: Request, state: State, principal: NamedDependency[Principal],
                    request_id: FromPath[str]) -> Response[dict[str, Any]]:
        include_text = story_query(_query(request))
        answer = await _service(state).story(Access(principal), _checked(request_id), include_text=include_text)
        return _respond(answer)

    @get("/usage", summary="Requests, tokens and denials per day, team, model", operation_id="getAuditUsage",
         operation_class=USAGE_OPERATION)
    async def usage(self, request: Request, state: State,
                    principal: NamedDependency[Principal]) -> Response[dict[str, Any]]:
        where, groups = usage_query(_query(request))
        return _respond(await _service(state).usage(Access(principal), where, groups))

    @get("/export", summary="Export entries as JSONL or CSV (streamed)", operation_id="exportAuditEntries",
         operation_class=EXPORT_OPERATION)
    async def export(self, request: Request, state: State, principal: NamedDependency[Principal]) -> Stream:
        query = entry_query(_query(request), allowed=EXPORT_PARAMS)
        read_id, chunks = await _service(state).export(Access(principal), query)
        headers = {**NO_STORE, "Content-Disposition": f'attachment; filename="audit.{query.fmt}"'}
        if read_id:
            headers[urls.REQUEST_ID_HEADER] = read_id
        return Stream(chunks, media_type=MEDIA_TYPES[query.fmt], headers=headers)

    @post(f"{_STORY_PATH}/flag", summary="Flag a request for attention", operation_id="flagAuditRequest",
          operation_class=FLAG_OPERATION, status_code=201)
    async def flag(self, request: Request, state: State, principal: NamedDependency[Principal],
                   request_id: FromPath[str]) -> Response[dict[str, Any]]:
        return await _act(request, state, principal, request_id, "flag")

    @post(f"{_STORY_PATH}/comment", summary="Comment on a request", operation_id="commentAuditRequest",
          operation_class=COMMENT_OPERATION, status_code=201)
    async def comment(self, request: Request, state: State, principal: NamedDependency[Principal],
                      request_id: FromPath[str]) -> Response[dict[str, Any]]:
        return await _act(request, state, principal, request_id, "comment")

    @post(f"{_STORY_PATH}/disposition", summary="Record the verdict on a request",
          operation_id="disposeAuditRequest", operation_class=DISPOSITION_OPERATION, status_code=201)
    async def disposition(self, request: Request, state: State, principal: NamedDependency[Principal],
                          request_id: FromPath[str]) -> Response[dict[str, Any]]:
        return await _act(request, state, principal, request_id, "disposition")


async def _act(request: Request, state: State, principal: Principal, request_id: str,
               action: str) -> Response[dict[str, Any]]:
    """A review action (any other path under a request is Litestar's 404 ``not_found``)."""
    access = Access(principal)
    access.require_reviewer()  # before reading the body: a non-reviewer learns nothing from its errors
    action_query(_query(request))
    fields = parse_action(action, await read_body(request))
    return _respond(await _service(state).act(access, _checked(request_id), action, fields), 201)

