"""Around every HTTP request: its id, its response headers, its metrics, its access-log line.

Wraps the Litestar app's whole ASGI handler (outside routing and the
exception handlers), so a 404 for an unknown path or a 500 from an
unexpected error is seen too, with the same id its error body's header
names. The id goes out twice: as ``X-Govgate-Request-Id`` and as
``x-request-id``, the header OpenAI's clients read into a response's
``_request_id`` and an error's ``request_id`` (without it they are None, and
a user quoting the id of a failed call has none to quote). Work per request is kept to a uuid, a context variable and a
counter: this runs on every request (issue 9 measures CPU per request).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from gateway.observability import context
from gateway.observability.metrics import count_request
from gateway.urls import OPENAI_REQUEST_ID_HEADER, REQUEST_ID_EXTENSION, REQUEST_ID_HEADER

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

_HEADER = REQUEST_ID_HEADER.lower().encode("latin-1")
_OPENAI_HEADER = OPENAI_REQUEST_ID_HEADER.lower().encode("latin-1")
#: Route label of a request that matched no route (never the raw path: anyone can make up paths).
UNMATCHED = "unmatched"

access_log = logging.getLogger("govgate.access")


class RequestContextMiddleware:
    """Give each HTTP request an id (context, header) and count it when answered."""

    def __init__(self, app: ASGIApp, *, log_access: bool = False) -> None:
        self.app = app
        self.log_access = log_access

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # the served protocol named the request when its head was read (gateway/http_head.py); else a new id
        ctx, token = context.begin((scope.get("extensions") or {}).get(REQUEST_ID_EXTENSION))
        status = 500  # what the server answers when the app ends without a response

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                named = [value for name, value in headers if name.lower() == _HEADER]
                if not named:  # a handler that names an audit entry set it; otherwise the request's own id
                    named = [ctx.request_id.encode()]
                    headers.append((_HEADER, named[0]))
                if not any(name.lower() == _OPENAI_HEADER for name, _ in headers):
                    headers.append((_OPENAI_HEADER, named[0]))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            endpoint = scope.get("path_template") or UNMATCHED
            seconds = time.perf_counter() - started
            count_request(endpoint, ctx.model, status, ctx.error_code, seconds)
            if self.log_access:
                access_log.info("%s %s %d", scope.get("method", "?"), endpoint, status,
                                extra={"method": scope.get("method"), "path": endpoint, "status": status,
                                       "model": ctx.model or None, "code": ctx.error_code or None,
                                       "duration_ms": round(seconds * 1000, 3)})
            context.end(token)
