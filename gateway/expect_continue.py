"""A request that asked ``Expect: 100-continue`` and was answered before its body was asked for closes its
connection.

uvicorn sends ``100 Continue`` when the app first reads the body. A request
refused before that (no key, a compressed body, a method the path does not
take) is answered with its final status and no ``100``: a client following
RFC 9110 then does not send the body (curl does not), but uvicorn kept the
connection open still owing it that body, so the client's next request on
the connection was read as the unsent body's bytes and answered ``400
Invalid HTTP request`` (a keep-alive client saw its next, valid request
fail). Such an answer now says ``Connection: close`` and the server closes
after it, as RFC 9110 (section 10.1.1) lets a server that answers before
reading the content; a client that did send the body loses nothing but the
connection. A request whose body was asked for (``100 Continue`` sent) keeps
its connection as before.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _expects_continue(scope: dict[str, Any]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


class CloseUnreadContinue:
    """Add ``Connection: close`` to the answer of an ``Expect: 100-continue`` request whose body was not read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not _expects_continue(scope):
            await self.app(scope, receive, send)
            return
        asked = False

        async def receive_noted() -> Any:
            nonlocal asked
            asked = True  # the server sends "100 Continue" now: the client will send the body
            return await receive()

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and not asked:
                message["headers"] = [*(message.get("headers") or []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive_noted, send_closing)
