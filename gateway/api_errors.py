"""Errors users see, in OpenAI's shape: ``{"error": {message, type, code, param}}``.

Every refusal is an :class:`ApiError` with a stable ``code``; the handlers
below give Litestar's own errors and anything unexpected the same shape, so
no client sees a traceback. Every error response carries
``X-Govgate-Request-Id`` (the README says which id it names).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Iterator

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from gateway.allowed_methods import allow_list
from gateway.observability.context import current_request_id, note_error
from gateway.urls import REQUEST_ID_HEADER

log = logging.getLogger(__name__)

#: The status of a request whose client closed its connection before the answer (nginx's 499): no client
#: reads it; it keeps such requests out of the server errors the metrics count.
CLIENT_CLOSED_STATUS = 499

# OpenAI's error "type" for each status class.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "invalid_request_error",  # the client closed its connection first (it never reads the answer)
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """A designed refusal: status, code, message, and optional extras."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                 request_id: str | None = None, counted_as: str | None = None,
                 logged_message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.extra = extra or {}
        self.headers = headers or {}
        #: The audit request id this error was recorded under, if any.
        self.request_id = request_id
        #: The code the metrics and the access log count this answer under, when it is not ``code``: a
        #: model the key may not see is answered as unknown but counted as what refused it
        #: (``gateway/requests/hidden_models.py``).
        self.counted_as = counted_as
        #: The message as a ``rejected`` audit entry keeps it, for a message that quotes text of the request
        #: body (a made-up field's name, a value outside a field's choices, a model's name): the same words
        #: with that text as ``'…'``. Said where the message is made, which alone knows where the client's
        #: text begins and ends (it may hold any quote mark); None: the message quotes no such text but
        #: what ``gateway/requests/audit_records.py`` elides by its quotes.
        self.logged_message = logged_message

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                 "code": self.code, "param": self.param}
        error.update(self.extra)
        return {"error": error}

    def to_response(self) -> Response:
        note_error(self.counted_as or self.code)
        headers = {**self.headers, REQUEST_ID_HEADER: self.request_id or current_request_id() or new_request_id()}
        return Response(self.body(), status_code=self.status, headers=headers, media_type=MediaType.JSON)


def new_request_id() -> str:
    return uuid.uuid4().hex


@contextlib.contextmanager
def errors_of(request_id: str) -> Iterator[None]:
    """Mark an :class:`ApiError` leaving the block as the request ``request_id``'s (the header names it)."""
    try:
        yield
    except ApiError as error:
        if error.request_id is None:
            error.request_id = request_id
        raise


def api_error_handler(_: Request, exc: ApiError) -> Response:
    return exc.to_response()


def not_found_message() -> str:
    """What a 404 for an unknown path says."""
    return _HTTP_CODES[404][1]


_HTTP_CODES = {
    404: ("not_found", "No such endpoint. The API lives under /v1 (see GET /v1/models)."),
    405: ("method_not_allowed", "This endpoint does not accept that HTTP method."),
    413: ("body_too_large", "The request body is larger than this gateway accepts."),
}


def http_exception_handler(_: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (routing, method, body size) in OpenAI's shape."""
    status = exc.status_code
    code, message = _HTTP_CODES.get(status, ("invalid_request" if status < 500 else "server_error", exc.detail))
    headers = dict(exc.headers or {})
    for name in [name for name in headers if name.lower() == "allow"]:  # the router's order is its own: sort
        headers[name] = ", ".join(allow_list(headers[name]))
    return ApiError(status if status in _TYPES else 400, code, message, headers=headers).to_response()


def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    """Last resort: log the traceback for operators, show the client no internals."""
    request_id = current_request_id() or new_request_id()
    log.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id)
    return ApiError(500, "internal_error", "The gateway hit an unexpected error; it has been logged. Nothing was "
                    "served.", request_id=request_id).to_response()


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    HTTPException: http_exception_handler,
    Exception: unexpected_error_handler,
}
