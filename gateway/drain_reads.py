"""Every request's body read ends at a stopping gateway's drain: a body still arriving is refused 503
``shutting_down``, whatever the endpoint.

A request whose body is still arriving when the stop begins has nothing
running that the drain should let finish. Before, only the completion
endpoints ended such a read (probe p1 F2); an upload to any other endpoint
(``POST /admin/keys``, the review API, the console's forms) held its
connection open through the drain until uvicorn's graceful timeout
cancelled it: a plain-text 500 and a ``CancelledError`` traceback in the
log (probe q1 F4).

So the drain is applied where every body is read, not in each handler: this
ASGI wrapper hands the app a ``receive`` whose reads go through
:meth:`gateway.drain.Drain.read_unless_stopping` until the body's last
message. A read under way at the drain's begin ends then, and one that
starts during the drain is refused without reading; either raises
:class:`gateway.api_errors.ApiError` (503 ``shutting_down``, Retry-After)
out of ``request.body()`` / ``request.form()``, which the endpoint's own
error handling answers: OpenAI's error shape on the API (a completion's
refusal is recorded ``rejected`` by its admission), the console's error page
under ``/console``. Handlers need nothing of their own, and a new endpoint
that reads a body is covered as it is written.

Once the body is whole, ``receive`` is passed through as it came: what
waits on it then (a completion waiting for its client's disconnect, a
streamed response's disconnect listener) is no body read and is ended by the
drain's cut, not its begin. A request that announces no body (no
``Content-Length`` or ``0``, no ``Transfer-Encoding``: every ``GET``) is not
wrapped at all, so the pages and ``/readyz`` are served during the drain.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from gateway.drain import Drain

Receive = Callable[[], Awaitable[Any]]
ASGIApp = Callable[[dict[str, Any], Receive, Callable[[Any], Awaitable[None]]], Awaitable[None]]


def announces_body(scope: dict[str, Any]) -> bool:
    """Whether the request's head says a body follows (a ``Content-Length`` above 0, or a
    ``Transfer-Encoding``)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


class DrainEndsBodyReads:
    """Reads of a request's body through :meth:`Drain.read_unless_stopping` (see the module docstring)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict[str, Any], receive: Receive,
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not announces_body(scope):
            await self.app(scope, receive, send)
            return
        drain = self.drain
        whole = False

        async def read() -> Any:
            nonlocal whole
            if whole:
                return await receive()
            message = await drain.read_unless_stopping(receive)
            if message["type"] != "http.request" or not message.get("more_body", False):
                whole = True  # the body's last part, or the client gone: what follows is no body read
            return message

        await self.app(scope, read, send)
