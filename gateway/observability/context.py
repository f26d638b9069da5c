"""The HTTP request being served, as a context variable: its id, its model, its error code.

One id names a request everywhere: the ``X-Govgate-Request-Id`` response
header, the audit entries (the admission takes it from here), and every log
line written while the request is served. A context variable carries it
without passing it through every call; asyncio copies the context into
tasks a request starts, and anyio's worker threads run in a copy too.

The context object is mutable so the request path can note what the
metrics label a request with (its model, once the registry knows it; its
error code) without returning it through every layer.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar


class RequestContext:
    """One HTTP request's id and what its outcome is labelled with."""

    __slots__ = ("request_id", "model", "error_code")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        #: The registry's name of the request's model ("" until known: never a name a client made up).
        self.model = ""
        #: The ``code`` of the OpenAI-shaped error it was answered with ("" for none).
        self.error_code = ""


_current: ContextVar[RequestContext | None] = ContextVar("govgate_request", default=None)


def begin(request_id: str | None = None) -> tuple[RequestContext, object]:
    """Start a request's context (under ``request_id``, or a new id); returns it and the token :func:`end` takes."""
    context = RequestContext(request_id or uuid.uuid4().hex)
    return context, _current.set(context)


def end(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str | None:
    """The id of the HTTP request being served, or None outside one (a background task, a CLI)."""
    context = _current.get()
    return None if context is None else context.request_id


def note_model(model: str) -> None:
    """Label the current request with its model (call only with a name the registry knows)."""
    context = _current.get()
    if context is not None:
        context.model = model


def note_error(code: str) -> None:
    """Label the current request with the error code it was answered with."""
    context = _current.get()
    if context is not None:
        context.error_code = code
