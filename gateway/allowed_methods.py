"""``OPTIONS`` answered with the methods a path really has, from the router itself.

Litestar adds an ``OPTIONS`` handler to each route, whose ``Allow`` is the
methods of the route as first registered: when handlers for the same path
come in more than one registration (``/admin/keys``: ``POST`` to create,
``GET`` to list), the route is rebuilt with all of them but keeps the first
``OPTIONS`` handler, so ``OPTIONS /admin/keys`` said ``OPTIONS, POST``
without ``GET``. The router's own table is right (its 405 names every
method), so this layer asks it: it routes the path with a method no route
has and reads the ``Allow`` of the refusal. A known path gets ``204`` with
``Allow`` listing them in order (``HEAD`` where the path has it, ``OPTIONS``
always); an unknown path, and a mount (the console's static files), go on
to the app as before (a 404 in OpenAI's shape; the mount answers for
itself). It wraps Litestar's ASGI handler inside the request-context
middleware, so the answer carries a request id and is counted like any.

``HEAD`` is answered here too, from the same table: a path that has
``GET`` and no ``HEAD`` handler of its own (every console page, the review
and key-administration reads, ``/v1/models``) is asked with ``GET`` and
answered with its status and headers and no body, as HTTP says a HEAD
answer is; before, they answered 405 while GET worked. Their ``OPTIONS``
``Allow`` lists ``HEAD`` for that reason. (``/healthz`` and ``/readyz``
have HEAD handlers of their own, which answer as before.) A HEAD is the
GET in all else: its key or session is checked, and a review read is
audited as the GET would be.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from litestar.exceptions import MethodNotAllowedException
from litestar.utils import normalize_path

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
#: Routed to learn a path's methods: no route has it, so the router refuses it naming those it has.
_PROBE = "GOVGATE-ALLOW-PROBE"


def allow_list(header: str) -> list[str]:
    """The methods of a router's ``Allow`` header, sorted, with ``HEAD`` wherever ``GET`` is: a GET-only
    path answers HEAD (:meth:`AllowedMethods._head`). The 405s' ``Allow`` is this list too."""
    methods = {method.strip() for method in header.split(",") if method.strip()}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class AllowedMethods:
    """Answer ``OPTIONS`` on a routed path with ``204`` and the ``Allow`` the router knows."""

    def __init__(self, app: ASGIApp, router: Any) -> None:
        self.app = app
        self.router = router  # the app's ASGIRouter (routes registered later are seen: it is asked per request)

    def _routed(self, path: str) -> set[str] | None:
        """The methods the router has handlers for at ``path``; None for no route, or a mount."""
        try:
            self.router.handle_routing(path=normalize_path(path), method=_PROBE)
        except MethodNotAllowedException as refusal:
            return {m.strip() for m in (refusal.headers or {}).get("allow", "").split(",") if m.strip()}
        except Exception:  # NotFoundException and the like: the app answers (and shapes) it
            return None
        return None

    def allowed(self, path: str) -> list[str] | None:
        """The methods ``path`` answers (:func:`allow_list`); None for no route, or a mount that answers
        for itself."""
        methods = self._routed(path)
        return None if methods is None else allow_list(", ".join(methods))

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        method = scope.get("method") if scope["type"] == "http" else None
        if method == "HEAD":
            await self._head(scope, receive, send)
            return
        if method != "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = _routed_path(scope)
        allowed = self.allowed(path)
        if allowed is None:
            await self.app(scope, receive, send)
            return
        try:  # the route's template, for the request's metrics and access line (as a routed request has)
            scope["path_template"] = self.router.handle_routing(path=normalize_path(path), method="OPTIONS")[4]
        except Exception:
            pass
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"allow", ", ".join(allowed).encode("latin-1"))]})
        await send({"type": "http.response.body", "body": b""})

    async def _head(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                    send: Callable[[Any], Awaitable[None]]) -> None:
        """A HEAD on a GET-only path: the GET, with its status and headers and no body."""
        methods = self._routed(_routed_path(scope))
        if methods is None or "HEAD" in methods or "GET" not in methods:
            await self.app(scope, receive, send)  # its own HEAD handler, a 405, a 404, or a mount
            return

        async def without_body(message: Any) -> None:
            if message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
            await send(message)

        # A copy asks for the GET: the server reads the method of its own scope (this one) when the answer
        # is sent, and only for a HEAD does it expect no body for the GET's Content-Length (changed in
        # place, uvicorn logged "Response content shorter than Content-Length" and dropped the connection).
        # The route's template the app writes in the copy names the request in the metrics and the access
        # line, read from this scope: it is carried back.
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, without_body)
        finally:
            if "path_template" in as_get:
                scope["path_template"] = as_get["path_template"]


def _routed_path(scope: dict[str, Any]) -> str:
    path = scope["path"]
    if root_path := scope.get("root_path", ""):
        path = path.split(root_path, maxsplit=1)[-1]
    return path
